"""`corrclip eval`: mIoU on the benchmarks, with the research code's data layouts and mmseg's metric."""

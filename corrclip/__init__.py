"""corrclip: an inference engine for training-free open-vocabulary semantic segmentation."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: `import corrclip` stays cheap for the CLI's --help and --version.
    if name == "Segmenter":
        from .api import Segmenter

        return Segmenter
    raise AttributeError(name)


__all__ = ["Segmenter", "__version__"]

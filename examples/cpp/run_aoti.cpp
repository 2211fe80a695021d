// Runs one graph of a corrclip engine bundle (an AOTInductor package, e.g. bundle/dino.cpu.pt2)
// on tensors read from a corrclip tensor file, and writes its outputs to another one.
//
//   run_aoti PACKAGE.pt2 INPUTS.cct OUTPUTS.cct
//
// Tensor file (corrclip/engine/tensorfile.py): "CCT1", uint32 count, then per tensor:
// uint32 dtype code (0 f32, 1 i64, 2 bool, 3 i32, 4 f16), uint32 ndim, int64 dims[ndim], raw data.
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/torch.h>

#include <cstdint>
#include <fstream>
#include <iostream>
#include <stdexcept>
#include <vector>

static const c10::ScalarType kTypes[] = {torch::kFloat32, torch::kInt64, torch::kBool, torch::kInt32,
                                         torch::kFloat16};

static uint32_t code_of(c10::ScalarType t) {
  for (uint32_t i = 0; i < 5; ++i)
    if (kTypes[i] == t) return i;
  throw std::runtime_error("unsupported dtype in output");
}

static std::vector<torch::Tensor> read_tensors(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  char magic[4];
  uint32_t count = 0;
  f.read(magic, 4);
  if (std::string(magic, 4) != "CCT1") throw std::runtime_error(path + " is not a corrclip tensor file");
  f.read(reinterpret_cast<char*>(&count), 4);
  std::vector<torch::Tensor> out;
  for (uint32_t i = 0; i < count; ++i) {
    uint32_t code = 0, ndim = 0;
    f.read(reinterpret_cast<char*>(&code), 4);
    f.read(reinterpret_cast<char*>(&ndim), 4);
    std::vector<int64_t> dims(ndim);
    f.read(reinterpret_cast<char*>(dims.data()), 8 * ndim);
    torch::Tensor t = torch::empty(dims, torch::TensorOptions().dtype(kTypes[code]));
    f.read(reinterpret_cast<char*>(t.data_ptr()), t.nbytes());
    out.push_back(t);
  }
  return out;
}

static void write_tensors(const std::string& path, const std::vector<torch::Tensor>& tensors) {
  std::ofstream f(path, std::ios::binary);
  uint32_t count = tensors.size();
  f.write("CCT1", 4);
  f.write(reinterpret_cast<const char*>(&count), 4);
  for (const auto& t0 : tensors) {
    torch::Tensor t = t0.contiguous().cpu();
    uint32_t code = code_of(t.scalar_type()), ndim = t.dim();
    f.write(reinterpret_cast<const char*>(&code), 4);
    f.write(reinterpret_cast<const char*>(&ndim), 4);
    for (int64_t d : t.sizes()) f.write(reinterpret_cast<const char*>(&d), 8);
    f.write(reinterpret_cast<const char*>(t.data_ptr()), t.nbytes());
  }
}

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: run_aoti PACKAGE.pt2 INPUTS.cct OUTPUTS.cct\n";
    return 2;
  }
  try {
    torch::NoGradGuard no_grad;
    torch::inductor::AOTIModelPackageLoader loader(argv[1]);
    std::vector<torch::Tensor> outputs = loader.run(read_tensors(argv[2]));
    write_tensors(argv[3], outputs);
    std::cout << "ran " << argv[1] << ": " << outputs.size() << " output(s)\n";
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}

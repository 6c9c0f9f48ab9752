// s2v_trt_runner: load a serialized TensorRT engine, give every input a shape, and time enqueueV3
// replayed as a CUDA graph. Written against the TensorRT 10.x / 11.x C++ API (named tensors, enqueueV3).
//
//   s2v_trt_runner engine.plan PROFILE ITERS name=d0xd1x... [name=...]
//
// Every buffer is filled with the byte pattern 0x3c (a small nonzero value in fp16 and fp32: zeros can run
// faster than real data); outputs are sized from the shapes the context infers from the inputs.
#include <NvInfer.h>
#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#define CHECK_CUDA(x)                                                                      \
  do {                                                                                     \
    cudaError_t e_ = (x);                                                                  \
    if (e_ != cudaSuccess) {                                                               \
      std::fprintf(stderr, "CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__); \
      std::exit(1);                                                                        \
    }                                                                                      \
  } while (0)

class Logger : public nvinfer1::ILogger {
  void log(Severity s, const char* msg) noexcept override {
    if (s <= Severity::kWARNING) std::cerr << "[TRT] " << msg << "\n";
  }
};

static size_t elementSize(nvinfer1::DataType t) {
  switch (t) {
    case nvinfer1::DataType::kFLOAT: case nvinfer1::DataType::kINT32: return 4;
    case nvinfer1::DataType::kHALF: case nvinfer1::DataType::kBF16: return 2;
    case nvinfer1::DataType::kINT64: return 8;
    default: return 1;
  }
}

static nvinfer1::Dims parseDims(const std::string& s) {
  nvinfer1::Dims d{};
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, 'x')) d.d[d.nbDims++] = std::stoll(item);
  return d;
}

static size_t volume(const nvinfer1::Dims& d) {
  size_t v = 1;
  for (int i = 0; i < d.nbDims; ++i) v *= static_cast<size_t>(d.d[i]);
  return v;
}

int main(int argc, char** argv) {
  if (argc < 5) {
    std::cerr << "usage: s2v_trt_runner engine.plan PROFILE ITERS name=AxBxC ...\n";
    return 2;
  }
  std::ifstream f(argv[1], std::ios::binary);
  if (!f) { std::cerr << argv[1] << ": cannot open\n"; return 2; }
  std::vector<char> plan((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  Logger logger;
  std::unique_ptr<nvinfer1::IRuntime> runtime(nvinfer1::createInferRuntime(logger));
  std::unique_ptr<nvinfer1::ICudaEngine> engine(runtime->deserializeCudaEngine(plan.data(), plan.size()));
  if (!engine) { std::cerr << argv[1] << ": not a TensorRT engine for this version/GPU; rebuild it\n"; return 3; }
  std::unique_ptr<nvinfer1::IExecutionContext> ctx(engine->createExecutionContext());
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  ctx->setOptimizationProfileAsync(std::atoi(argv[2]), stream);
  const int iters = std::atoi(argv[3]);

  std::map<std::string, nvinfer1::Dims> shapes;
  for (int i = 4; i < argc; ++i) {
    std::string a(argv[i]);
    auto eq = a.find('=');
    shapes[a.substr(0, eq)] = parseDims(a.substr(eq + 1));
  }
  std::vector<void*> buffers;
  for (int i = 0; i < engine->getNbIOTensors(); ++i) {
    const char* name = engine->getIOTensorName(i);
    if (engine->getTensorIOMode(name) != nvinfer1::TensorIOMode::kINPUT) continue;
    auto it = shapes.find(name);
    if (it == shapes.end()) { std::cerr << "missing shape for input " << name << "\n"; return 2; }
    if (!ctx->setInputShape(name, it->second)) { std::cerr << name << ": shape outside the profile\n"; return 2; }
  }
  for (int i = 0; i < engine->getNbIOTensors(); ++i) {
    const char* name = engine->getIOTensorName(i);
    nvinfer1::Dims d = ctx->getTensorShape(name);
    size_t bytes = volume(d) * elementSize(engine->getTensorDataType(name));
    void* p = nullptr;
    CHECK_CUDA(cudaMalloc(&p, bytes));
    CHECK_CUDA(cudaMemset(p, 0x3c, bytes));  // a small nonzero pattern in fp16/fp32 alike
    buffers.push_back(p);
    ctx->setTensorAddress(name, p);
  }
  if (!ctx->enqueueV3(stream)) { std::cerr << "enqueueV3 failed\n"; return 4; }  // warm-up outside capture
  CHECK_CUDA(cudaStreamSynchronize(stream));
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CHECK_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  if (!ctx->enqueueV3(stream)) { std::cerr << "enqueueV3 failed during capture\n"; return 4; }
  CHECK_CUDA(cudaStreamEndCapture(stream, &graph));
  CHECK_CUDA(cudaGraphInstantiate(&exec, graph, 0));
  cudaEvent_t t0, t1;
  CHECK_CUDA(cudaEventCreate(&t0));
  CHECK_CUDA(cudaEventCreate(&t1));
  CHECK_CUDA(cudaEventRecord(t0, stream));
  for (int i = 0; i < iters; ++i) CHECK_CUDA(cudaGraphLaunch(exec, stream));
  CHECK_CUDA(cudaEventRecord(t1, stream));
  CHECK_CUDA(cudaEventSynchronize(t1));
  float ms = 0;
  CHECK_CUDA(cudaEventElapsedTime(&ms, t0, t1));
  std::printf("%s: %.3f ms per run (%d runs, CUDA graph)\n", argv[1], ms / iters, iters);
  for (void* p : buffers) cudaFree(p);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
  return 0;
}

// A quantized delta as the kernels see it (the fields of the descriptor cpu_kernel.py writes;
// docs/FORMAT.md for the tensors). Included inside the kernels' namespace by delta_cpu.cpp, and by
// tests/native/kernel_check.cpp, which runs the portable kernel without PyTorch (also on ARM64
// under an emulator).
struct Desc {
  int64_t out, in, bits, n, group_size, n_groups, param_stride, k, row_bytes;
  const uint8_t* codes;
  const c10::Half* scale;
  const c10::Half* offset;
  const int32_t* salient_idx;
  const c10::Half* salient_values;
};

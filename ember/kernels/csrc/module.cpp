// Python bindings of Ember's native kernels (built by ember/kernels/native.py).
#include <torch/extension.h>

torch::Tensor qdot_matmul(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, torch::Tensor mins,
                          int64_t bits, int64_t offset, torch::Tensor scodes, torch::Tensor mcodes);
torch::Tensor qdot_dequant(torch::Tensor codes, torch::Tensor scales, torch::Tensor mins, int64_t bits,
                           int64_t offset, torch::Tensor scodes, torch::Tensor mcodes, int64_t n0, int64_t n1);
torch::Tensor paged_attention(torch::Tensor q, torch::Tensor kpool, torch::Tensor vpool, torch::Tensor tables,
                              torch::Tensor lens, int64_t block_size, int64_t window, double scale);
bool supports_head_sizes(int64_t d, int64_t dv);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps);
std::tuple<torch::Tensor, torch::Tensor> add_rms_norm(torch::Tensor x, torch::Tensor delta, torch::Tensor w,
                                                      double eps);
torch::Tensor gated_act(torch::Tensor h, int64_t n_ff, int64_t act);
torch::Tensor rope(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, bool neox);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("qdot_matmul", &qdot_matmul, "y = x @ W^T over a qdot-packed weight (qdot.cpp)");
  m.def("qdot_dequant", &qdot_dequant, "columns of a qdot-packed weight as bfloat16 (qdot.cpp)");
  m.def("paged_attention", &paged_attention, "decode attention through block tables (paged_attention.cpp)");
  m.def("paged_attention_supports", &supports_head_sizes, "whether paged_attention handles these head sizes");
  m.def("rms_norm", &rms_norm, "RMS norm of every row (glue.cpp)");
  m.def("add_rms_norm", &add_rms_norm, "(x + delta, rms_norm(x + delta)) (glue.cpp)");
  m.def("rope", &rope, "rotary embedding of every head, full-width cos/sin tables per token (glue.cpp)");
  m.def("gated_act", &gated_act, "act(h[:, :n_ff]) * h[:, n_ff:2 n_ff], act 0 silu / 1 gelu_tanh (glue.cpp)");
}

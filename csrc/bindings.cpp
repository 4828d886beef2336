// The extension module kvslimmer_vllm._C: importing it registers the torch.ops.kvslimmer ops.
// It holds no Python functions of its own, so it needs neither pybind11 nor torch/extension.h.

#include <Python.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(kvslimmer, m) {
  m.def(
      "paged_attention(Tensor query, Tensor kv, Tensor? counts, Tensor block_table, "
      "Tensor seq_lens, Tensor query_start_loc, float scale, int block_size, "
      "Tensor(a!)? mass, Tensor? observed=None) -> Tensor");
  m.def("select_pairs(Tensor scores, int k) -> Tensor", &kvslimmer::select_pairs);
  m.def("select_pairs_rows(Tensor scores, Tensor lengths, Tensor ks) -> Tensor",
        &kvslimmer::select_pairs_rows);
  m.def(
      "protected_steps(Tensor masks, Tensor held, Tensor remaining, int sink, int recent, "
      "float max_fraction) -> Tensor",
      &kvslimmer::protected_steps);
  m.def(
      "protected_merged(Tensor(a!) masks, Tensor(b!) held, Tensor(c!) remaining, Tensor rows, "
      "Tensor left, int sink) -> Tensor",
      &kvslimmer::protected_merged);
  m.def("keep_set(Tensor scores, int k) -> Tensor", &kvslimmer::keep_set);
  m.def("cpu_isa(str? isa=None) -> str", &kvslimmer::cpu_isa);
  m.def("cpu_isas() -> str[]", &kvslimmer::cpu_isas);
  m.def("value_spread(Tensor values, Tensor alpha) -> Tensor");
  m.def(
      "merge_pairs(Tensor keys, Tensor values, Tensor left, Tensor a, Tensor c_left, "
      "Tensor c_right, Tensor? cos_sin, Tensor? delta, int rotary_dim, bool is_neox) "
      "-> (Tensor, Tensor)");
  m.def(
      "compact_rows(Tensor(a!)[] kvs, Tensor slots, Tensor source, int start, "
      "Tensor merged_slots, Tensor merged_keys, Tensor merged_values) -> ()");
  m.def(
      "write_tokens(Tensor(a!) kv, Tensor key, Tensor value, Tensor slots, Tensor positions, "
      "Tensor(b!)? counts=None, Tensor(c!)? slot_positions=None, Tensor(d!)? hess=None, "
      "Tensor(e!)? mass=None) -> ()");
  m.def(
      "round_stats(Tensor[] kvs, Tensor slots, Tensor layers, Tensor hess, Tensor mass, "
      "int sink, int recent, int round_idx, float gamma, int pool, Tensor? held=None) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "round_apply(Tensor(a!)[] kvs, Tensor slots, Tensor layers, Tensor(b!) counts, "
      "Tensor(c!) positions, Tensor(d!) hess, Tensor(e!) mass, Tensor left, Tensor alpha, "
      "Tensor h, int sink, int recent, float eps, bool hessian_weights, Tensor? cos_sin, "
      "int rotary_dim, bool is_neox, bool carry_mass=False, Tensor? held=None) -> ()");
  m.def("slot_scores(Tensor slots, Tensor layers, Tensor mass, int sink, int recent, int pool) "
        "-> Tensor");
  m.def(
      "protected_round(Tensor(a!)[] kvs, Tensor slots, Tensor layers, Tensor(b!) counts, "
      "Tensor(c!) positions, Tensor(d!) hess, Tensor(e!) mass, Tensor protect, int k, "
      "float max_fraction, int sink, int recent, int round_idx, float gamma, float eps, "
      "int pool, bool hessian_weights, Tensor? cos_sin, int rotary_dim, bool is_neox) -> ()");
}

TORCH_LIBRARY_IMPL(kvslimmer, CPU, m) {
  m.impl("paged_attention", &kvslimmer::paged_attention_cpu);
  m.impl("value_spread", &kvslimmer::value_spread);
  m.impl("merge_pairs", &kvslimmer::merge_pairs);
  m.impl("compact_rows", &kvslimmer::compact_rows);
  m.impl("write_tokens", &kvslimmer::write_tokens);
  m.impl("round_stats", &kvslimmer::round_stats);
  m.impl("slot_scores", &kvslimmer::slot_scores);
  m.impl("protected_round", &kvslimmer::protected_round);
  m.impl("round_apply", &kvslimmer::round_apply);
}

TORCH_LIBRARY_IMPL(kvslimmer, Meta, m) {
  m.impl("paged_attention", &kvslimmer::paged_attention_meta);
}

static PyModuleDef kvslimmer_module = {
    PyModuleDef_HEAD_INIT,
    "_C",                                                                       // m_name
    "kvslimmer C++ ops; importing this module registers torch.ops.kvslimmer.*",  // m_doc
    -1,                                                                         // m_size
    nullptr, nullptr, nullptr, nullptr, nullptr,  // methods, slots, traverse, clear, free
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kvslimmer_module); }

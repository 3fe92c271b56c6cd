//! The TileFlow engine: model specs, tile packs, tokenizer, sampler, the batched forward pass
//! over a `Backend`, and the tier cache that streams routed experts.

pub mod backend;

/// An error and its sources as one line (`outer: cause: root cause`), for messages that cross a
/// channel or an HTTP body and so cannot carry the source chain themselves.
pub use tileflow_spdk::error_chain;

pub mod dtype;
pub mod forward;
pub mod generate;
pub mod kv;
pub mod model;
pub mod pack;
pub mod rope;
pub mod safetensors_io;
pub mod sampler;
pub mod sched;
pub mod spec;
pub mod store;
pub mod synth;
pub mod synth_tokenizer;
pub mod tier;
pub mod tokenizer;
pub mod weights;

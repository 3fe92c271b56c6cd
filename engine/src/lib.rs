//! The TileFlow engine.

pub mod sampler;
pub mod synth_tokenizer;
pub mod tokenizer;

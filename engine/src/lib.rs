//! The TileFlow engine.

pub mod sampler;

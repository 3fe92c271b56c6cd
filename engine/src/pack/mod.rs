//! Tile packs: the on-disk form of a model in the store (see DESIGN.md, Formats).

pub mod import;
pub mod manifest;
pub mod names;
pub mod write;

pub use manifest::{ExpertExtent, Manifest, Projection, ProjectionExtent};

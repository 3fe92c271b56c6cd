//! Tile packs: the on-disk form of a model in the store (see DESIGN.md, Formats).

pub mod manifest;

pub use manifest::{ExpertExtent, Manifest, Projection, ProjectionExtent};

//! The TileFlow engine.

//! `tilectl`, the TileFlow admin CLI.
fn main() {}

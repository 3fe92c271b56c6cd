//! API request and response types shared by the daemon and tilectl, and a client over the
//! daemon's Unix socket.

pub mod openai;

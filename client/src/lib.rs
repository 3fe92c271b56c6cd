//! API request and response types shared by the daemon and tilectl, and a client over the
//! daemon's Unix socket.
//!
//! ```no_run
//! use tileflow_client::blocking::Client;
//! use tileflow_client::openai::{ChatCompletionRequest, ChatMessage};
//!
//! let client = Client::new("/run/tileflowd.sock")?;
//! let request = ChatCompletionRequest {
//!     model: "olmoe".into(),
//!     messages: vec![ChatMessage { role: "user".into(), content: "Hi".into(), name: None }],
//!     ..Default::default()
//! };
//! for chunk in client.chat_stream(&request)? {
//!     let chunk = chunk?;
//!     if let Some(text) = chunk.choices.first().and_then(|c| c.delta.as_ref()?.content.as_deref()) {
//!         print!("{text}");
//!     }
//! }
//! # Ok::<(), tileflow_client::ClientError>(())
//! ```

pub mod blocking;
mod client;
mod error;
pub mod framing;
pub mod native;
pub mod openai;
mod stream;
mod transport;
pub mod units;

pub use client::{Client, DEFAULT_SOCKET};
pub use error::ClientError;
pub use stream::EventStream;

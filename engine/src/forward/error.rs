//! Why a forward step failed, and which sequences a failure concerns.

use crate::backend::BackendError;
use crate::kv::{KvError, SeqId};
use crate::weights::WeightsError;

/// Why a forward step (or setting one up) failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A backend op failed inside a decoder layer.
    #[error("layer {layer}: {op} failed")]
    Layer {
        /// The decoder layer.
        layer: usize,
        /// The part of the layer.
        op: &'static str,
        /// What the backend said.
        #[source]
        source: BackendError,
    },
    /// A backend op outside the layers failed.
    #[error("{op} failed")]
    Backend {
        /// The op.
        op: &'static str,
        /// What the backend said.
        #[source]
        source: BackendError,
    },
    /// The KV cache refused.
    #[error(transparent)]
    Kv(#[from] KvError),
    /// The dense weights could not be built or uploaded.
    #[error(transparent)]
    Weights(#[from] WeightsError),
    /// The runner's configuration does not fit the model.
    #[error("invalid runner configuration: {reason}")]
    Config {
        /// What does not fit.
        reason: String,
    },
    /// A chunk names a sequence that was never added (or was freed).
    #[error("sequence {seq} is not known to the engine")]
    UnknownSequence {
        /// The sequence.
        seq: SeqId,
    },
    /// A sequence appears in two chunks of one step.
    #[error("sequence {seq} appears more than once in one step")]
    DuplicateSequence {
        /// The sequence.
        seq: SeqId,
    },
    /// A chunk without tokens.
    #[error("sequence {seq}: empty chunk")]
    EmptyChunk {
        /// The sequence.
        seq: SeqId,
    },
    /// A chunk starts past the tokens the sequence has cached.
    #[error("sequence {seq}: chunk starts at position {start_pos} but only {cached} are cached")]
    PositionGap {
        /// The sequence.
        seq: SeqId,
        /// The chunk's first position.
        start_pos: usize,
        /// Positions cached.
        cached: usize,
    },
    /// A token id outside the vocabulary.
    #[error("sequence {seq}: token id {token} is outside the vocabulary of {vocab}")]
    TokenOutOfRange {
        /// The sequence.
        seq: SeqId,
        /// The token id.
        token: u32,
        /// The vocabulary size.
        vocab: usize,
    },
    /// A routed expert could not be had.
    #[error("layer {layer} expert {expert} is unavailable: {reason}")]
    ExpertUnavailable {
        /// The decoder layer.
        layer: usize,
        /// The expert.
        expert: usize,
        /// Why.
        reason: String,
    },
    /// Reading a routed expert failed in the storage or cache underneath.
    #[error("layer {layer} expert {expert}: cannot read its weights")]
    ExpertRead {
        /// The decoder layer.
        layer: usize,
        /// The expert.
        expert: usize,
        /// The underlying failure.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A routed expert failed ([`EngineError::ExpertRead`] or
    /// [`EngineError::ExpertUnavailable`] underneath), and only the sequences whose tokens were
    /// routed to it needed it: the others of the step can run again without them.
    #[error("a routed expert failed for {} of the step's sequences", seqs.len())]
    RoutedExpert {
        /// The sequences whose tokens were routed to the failed expert (ascending, no repeats).
        seqs: Vec<SeqId>,
        /// The expert's failure.
        #[source]
        source: Box<EngineError>,
    },
}

impl EngineError {
    /// The sequences a failed step concerns, when only some of them did: those routed to a
    /// routed expert that failed. `None` when the failure concerns the whole step.
    pub fn failed_sequences(&self) -> Option<&[SeqId]> {
        match self {
            EngineError::RoutedExpert { seqs, .. } => Some(seqs),
            _ => None,
        }
    }

    /// The (layer, expert) an expert failure names, looking through [`EngineError::RoutedExpert`].
    pub fn expert(&self) -> Option<(usize, usize)> {
        match self {
            EngineError::ExpertUnavailable { layer, expert, .. }
            | EngineError::ExpertRead { layer, expert, .. } => Some((*layer, *expert)),
            EngineError::RoutedExpert { source, .. } => source.expert(),
            _ => None,
        }
    }

    /// Wraps a backend error of `op` in `layer`.
    pub(super) fn at(
        layer: usize,
        op: &'static str,
    ) -> impl Fn(BackendError) -> EngineError + Copy {
        move |source| EngineError::Layer { layer, op, source }
    }

    /// Wraps a backend error of `op` outside the layers.
    pub(super) fn op(op: &'static str) -> impl Fn(BackendError) -> EngineError + Copy {
        move |source| EngineError::Backend { op, source }
    }
}

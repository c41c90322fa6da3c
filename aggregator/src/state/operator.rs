//! The one operator shape every stateful stage is written against (after Arroyo's
//! `ArrowOperator`): process an input, react to the watermark, checkpoint the state it
//! declared, and restore it. State lives in the tables an operator declares; recovery and
//! checkpointing code only ever goes through this trait.

/// A named piece of operator state, checkpointed as one blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateDecl {
    /// Table name in the checkpoint.
    pub table: &'static str,
    /// What it holds (for docs and debugging).
    pub what: &'static str,
}

/// A stateful stage of the pipeline.
pub trait Operator {
    /// What it consumes.
    type Input;
    /// What it emits per input.
    type Output;

    /// The tables this operator checkpoints.
    fn declared_state(&self) -> &'static [StateDecl];

    /// Processes one input. Must be deterministic: a WAL replay feeds the same inputs in
    /// the same order and must reach the same state.
    fn process(&mut self, input: Self::Input) -> Self::Output;

    /// The watermark advanced to `watermark_ms` (event time): finalise, evict.
    fn on_watermark(&mut self, watermark_ms: i64);

    /// Serialises each declared table.
    fn checkpoint(&self) -> Vec<(&'static str, Vec<u8>)>;

    /// Restores from the tables written by `checkpoint` (missing tables = empty state).
    fn restore(&mut self, tables: &[(String, Vec<u8>)]) -> Result<(), String>;
}

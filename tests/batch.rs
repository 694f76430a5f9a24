//! Batches (`tierlimit::backend::batch`): the soundness model on a
//! simulated store, and the batcher over the memory backend on a fake
//! clock.

#[path = "batch/memory.rs"]
mod memory;
#[path = "batch/props.rs"]
mod props;

//! The CPU engine: our own forward pass over the mapped weights, with
//! lorafold-kernels' block kernels, a worker pool owned by the session, a
//! preallocated KV cache and scratch, and adapters fused into each
//! projection. candle stays the path on CUDA and Metal, and the independent
//! reference in tests.

pub mod ops;
pub mod pool;
pub mod session;
pub mod weights;

pub use session::{CpuSession, KvType, LinearInput, LinearObserver, StepError};
pub use weights::{CpuWeights, Factor, LoraFactors, Matrix, WeightProblem};

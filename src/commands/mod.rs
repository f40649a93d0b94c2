//! The operator's commands besides `run`: `audit`, `status` and `check`.

pub mod audit;
pub mod check;
pub mod status;

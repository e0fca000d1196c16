//! Helpers live in the test files; this crate exists only to hold the end-to-end tests.

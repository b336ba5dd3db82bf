//! Unit tests of the HTTP/2 layer: frames (`frames`).

mod frames;

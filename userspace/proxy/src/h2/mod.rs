//! HTTP/2's first layer, sans-io: frames ([`frame`]), the joining of header blocks across
//! CONTINUATION frames ([`block`]), HPACK ([`hpack`], with its Huffman code in `huffman`), the
//! decoded header list and the request rules of RFC 9113 §8 ([`fields`]), and the errors with
//! their codes and scopes ([`error`]). Every limit that defends a connection against a peer at
//! this layer is here with a name: max frame size, CONTINUATION flood, header block size,
//! HPACK bomb (header list size with the 32-octet overhead), field count, table size.
//!
//! On top of them: the client connection ([`conn`]: streams, flow control, SETTINGS, the
//! rate limits, GOAWAY), each stream served by one HTTP/1.1 exchange through a [`stream`]
//! wire (its request written as HTTP/1.1 by [`request`], its response read back by
//! [`response`]), and h2c to backends ([`upstream`]). [`memory`] drives the connection over
//! bytes in memory (the fuzz target `h2_conn`). The first layer's flow:
//!
//! ```text
//! bytes --frame::parse--> Frame --block::Assembler::push--> HeaderBlock
//!       --hpack::Decoder::decode--> HeaderList (pseudo-headers apart, checked)
//! HeaderList <--hpack::encode_response-- ; frames <--frame::write_frame / write_header_block--
//! ```

pub mod block;
pub mod conn;
pub mod error;
pub mod fields;
pub mod frame;
pub mod hpack;
mod huffman;
pub mod memory;
pub mod request;
pub mod response;
pub mod stream;
pub mod upstream;

#[cfg(test)]
mod tests;

pub use error::{ErrorCode, H2Error, HpackFault, Malformed, Reason, Scope};

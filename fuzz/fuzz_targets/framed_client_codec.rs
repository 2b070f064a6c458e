//! Fuzzes the framed client protocol decoder (`edgegate::framed::ClientCodec`)
//! as the gateway drives it: bytes arrive in arbitrary pieces and are decoded
//! until an error. Must never panic, and the read buffer must never grow
//! past one maximal frame (a length field is checked before any allocation).
#![no_main]

use bytes::{BufMut, BytesMut};
use edgegate::framed::{ClientCodec, MAX_HELLO_BYTES};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

const MAX_MESSAGE: usize = 4096;

fuzz_target!(|data: &[u8]| {
    // First byte picks the piece size, so splits are explored too.
    let Some((&split, input)) = data.split_first() else {
        return;
    };
    let piece = usize::from(split).max(1);
    let mut codec = ClientCodec::new(MAX_MESSAGE);
    let mut buf = BytesMut::with_capacity(512);
    let bound = 2 * (MAX_MESSAGE.max(MAX_HELLO_BYTES) + 8 + 256) + input.len();
    for chunk in input.chunks(piece) {
        buf.put_slice(chunk);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => return,
            }
        }
        assert!(buf.capacity() <= bound, "read buffer grew to {}", buf.capacity());
    }
    let _ = codec.decode_eof(&mut buf);
});

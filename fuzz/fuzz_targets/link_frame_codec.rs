//! Fuzzes the link protocol decoder (`edgegate_link::proto::FrameCodec`) the
//! way both ends of a link drive it. Must never panic; the buffer never grows
//! past one maximal frame; every frame it accepts encodes back to a frame
//! that decodes to the same value.
#![no_main]

use bytes::{BufMut, BytesMut};
use edgegate_link::proto::FrameCodec;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::{Decoder, Encoder};

const MAX_FRAME: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let Some((&split, input)) = data.split_first() else {
        return;
    };
    let piece = usize::from(split).max(1);
    let mut codec = FrameCodec::new(MAX_FRAME);
    let mut buf = BytesMut::with_capacity(512);
    let bound = 2 * (MAX_FRAME + 8 + 256) + input.len();
    for chunk in input.chunks(piece) {
        buf.put_slice(chunk);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => {
                    let mut wire = BytesMut::new();
                    codec.encode(&frame, &mut wire).expect("a decoded frame encodes");
                    let again = codec.decode(&mut wire).expect("re-decodes").expect("complete");
                    assert_eq!(again, frame);
                    assert!(wire.is_empty());
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
        assert!(buf.capacity() <= bound, "read buffer grew to {}", buf.capacity());
    }
    let _ = codec.decode_eof(&mut buf);
});

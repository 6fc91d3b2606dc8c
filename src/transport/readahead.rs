//! Large socket reads without a large buffer per connection.
//!
//! A node holds many idle connections, so the codecs above read through a small buffer
//! (1 KiB, allocated only once there is something to read: `super::poll_read_frames`). A
//! busy connection would then need one `recv` per kilobyte. [`ReadAhead`] sits
//! under the codec and reads from the socket into a buffer owned by the worker thread, up to
//! [`CHUNK`] bytes per system call; the part the codec did not ask for yet is kept in a
//! buffer of the connection's own that exists only while it holds bytes. Idle connections
//! hold nothing; busy ones make one system call per burst (a session that stops reading,
//! being pushed back, may keep up to one chunk).

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes asked of the socket per read.
pub const CHUNK: usize = 16 * 1024;

thread_local! {
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; CHUNK].into_boxed_slice());
}

/// A stream whose reads take up to [`CHUNK`] bytes from the inner stream at a time.
#[derive(Debug)]
pub struct ReadAhead<S> {
    inner: S,
    /// Read from the socket, not yet taken by the caller: `rest[taken..]`. Empty (and
    /// unallocated) whenever the caller has taken everything.
    rest: Vec<u8>,
    taken: usize,
}

impl<S> ReadAhead<S> {
    pub fn new(inner: S) -> Self {
        Self { inner, rest: Vec::new(), taken: 0 }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Bytes read from the socket that the caller has not taken yet.
    pub fn buffered(&self) -> usize {
        self.rest.len() - self.taken
    }

    /// Copies what is kept into `buf`, freeing the keep buffer once it is all taken.
    fn take_rest(&mut self, buf: &mut ReadBuf<'_>) {
        let n = self.buffered().min(buf.remaining());
        buf.put_slice(&self.rest[self.taken..self.taken + n]);
        self.taken += n;
        if self.taken == self.rest.len() {
            self.rest = Vec::new();
            self.taken = 0;
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if this.buffered() > 0 {
            this.take_rest(buf);
            return Poll::Ready(Ok(()));
        }
        if buf.remaining() >= CHUNK {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        SCRATCH.with(|scratch| {
            // Taken already only if the inner stream is itself read through a ReadAhead on
            // this thread: then read straight into the caller's buffer.
            let Ok(mut scratch) = scratch.try_borrow_mut() else {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            };
            let mut chunk = ReadBuf::new(&mut scratch[..]);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut chunk))?;
            let read = chunk.filled();
            let n = read.len().min(buf.remaining());
            buf.put_slice(&read[..n]);
            if n < read.len() {
                this.rest.extend_from_slice(&read[n..]);
            }
            Poll::Ready(Ok(()))
        })
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A reader that counts how often it is asked for bytes.
    struct Counting<R> {
        inner: R,
        reads: usize,
    }

    impl<R: AsyncRead + Unpin> AsyncRead for Counting<R> {
        fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            self.reads += 1;
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    #[tokio::test]
    async fn small_reads_are_served_from_one_large_read_and_nothing_is_kept_after() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let mut r = ReadAhead::new(Counting { inner: &data[..], reads: 0 });
        let mut out = Vec::new();
        let mut small = [0u8; 1024];
        loop {
            let n = r.read(&mut small).await.unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&small[..n]);
            if out.len() == data.len() {
                // All 10,000 bytes came out of the first read of the inner stream.
                assert_eq!(r.inner.reads, 1);
                assert_eq!(r.buffered(), 0);
                assert_eq!(r.rest.capacity(), 0, "the keep buffer is freed once drained");
            }
        }
        assert_eq!(out, data);
    }

    /// Passes reads on in pieces of at most 100 bytes (as a TLS layer reads records).
    struct Small<R>(R);

    impl<R: AsyncRead + Unpin> AsyncRead for Small<R> {
        fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            let mut piece = vec![0u8; buf.remaining().min(100)];
            let mut small = ReadBuf::new(&mut piece);
            ready!(Pin::new(&mut self.0).poll_read(cx, &mut small))?;
            buf.put_slice(small.filled());
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn nested_read_aheads_share_the_thread_buffer_without_panicking() {
        let data: Vec<u8> = (0..5000u32).map(|i| (i % 13) as u8).collect();
        // The outer one holds the thread's buffer while the inner one is asked for 100 bytes.
        let mut r = ReadAhead::new(Small(ReadAhead::new(&data[..])));
        let mut out = Vec::new();
        r.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, data);
        let mut empty = [0u8; 0];
        assert_eq!(r.read(&mut empty).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn data_larger_than_a_chunk_arrives_whole_and_in_order() {
        let data: Vec<u8> = (0..(3 * CHUNK + 17) as u32).map(|i| (i * 7 % 256) as u8).collect();
        let (mut a, b) = tokio::io::duplex(64 * 1024);
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            for piece in sent.chunks(5000) {
                a.write_all(piece).await.unwrap();
            }
        });
        let mut r = ReadAhead::new(b);
        let mut out = vec![0u8; data.len()];
        // Mixed sizes: smaller than, and larger than, a chunk.
        let (head, tail) = out.split_at_mut(1000);
        r.read_exact(head).await.unwrap();
        r.read_exact(tail).await.unwrap();
        writer.await.unwrap();
        assert_eq!(out, data);
    }
}

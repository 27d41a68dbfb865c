//! Large bodies stream through the sidecar without being buffered
//! (issue 2, point 4): 200 MB up and 200 MB down while the sidecar's
//! resident memory stays under 64 MB.

use std::convert::Infallible;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use meshlet_e2e::{SidecarProcess, Upstream};
use tokio::net::TcpStream;

const TOTAL: u64 = 200 * 1024 * 1024;
const RSS_LIMIT: u64 = 64 * 1024 * 1024;

async fn connect(
    sidecar: &SidecarProcess,
) -> hyper::client::conn::http1::SendRequest<StreamBody<ChunkStream>> {
    let stream = TcpStream::connect(sidecar.inbound).await.unwrap();
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    sender
}

type ChunkStream = futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>;

/// `TOTAL` bytes as 64 KiB frames that all share one buffer (the test
/// process doesn't hold 200 MB either).
fn upload_body(total: u64) -> StreamBody<ChunkStream> {
    let chunk = Bytes::from(vec![b'u'; 64 * 1024]);
    let frames: Vec<_> = (0..total / chunk.len() as u64)
        .map(|_| Ok(Frame::data(chunk.clone())))
        .collect();
    StreamBody::new(futures_util::stream::iter(frames))
}

#[tokio::test]
async fn two_hundred_megabytes_stream_up_and_down_in_bounded_memory() {
    let app = Upstream::start("files").await;
    let sidecar = SidecarProcess::builder("files", app.port()).start().await;
    let baseline = sidecar.rss_bytes();

    // Upload: the app counts what it receives.
    let mut sender = connect(&sidecar).await;
    let request = Request::post("/upload")
        .header("host", "files")
        .header("content-length", TOTAL.to_string())
        .body(upload_body(TOTAL))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let received = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(String::from_utf8_lossy(&received), TOTAL.to_string());

    // Download: read frame by frame, never holding the whole body.
    let request = Request::get(format!("/download?bytes={TOTAL}"))
        .header("host", "files")
        .body(upload_body(0))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut downloaded = 0u64;
    while let Some(frame) = body.frame().await {
        downloaded += frame.unwrap().data_ref().map_or(0, |d| d.len() as u64);
    }
    assert_eq!(downloaded, TOTAL);

    // VmHWM is the peak resident set over the process's whole life.
    let peak = sidecar.peak_rss_bytes();
    eprintln!(
        "sidecar RSS: baseline {} KiB, peak {} KiB",
        baseline / 1024,
        peak / 1024
    );
    assert!(
        peak < RSS_LIMIT,
        "sidecar peak RSS {} MiB >= 64 MiB",
        peak >> 20
    );
}

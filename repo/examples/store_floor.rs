//! Benchmark helper: what the object store itself can do with a repository's bytes,
//! with no backup tool's work around it (`bench/object_store.sh`). It reads every
//! object under `FROM` (a repository's prefix) into memory with CONCURRENCY requests in
//! flight, then writes them all under `TO` the same way, and prints the wall of each.
//! No backup tool that has to move those bytes through that store can be faster than
//! this (the "floor" rows of the benchmark).
//!
//! Credentials come from the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`).
//!
//! Run: `cargo run --release -p haul-repo --example store_floor s3:URL/BUCKET/FROM TO CONCURRENCY`
//! (`TO` is a prefix in the same bucket; it must be empty).

use std::sync::Arc;
use std::time::Instant;

use futures_util::{StreamExt, TryStreamExt};
use haul_repo::backend::{S3Credentials, S3Location};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, from, to, concurrency] = args.as_slice() else {
        eprintln!("usage: store_floor s3:URL/BUCKET/FROM TO CONCURRENCY");
        std::process::exit(2);
    };
    let location = match S3Location::parse(from) {
        Some(Ok(l)) => l,
        _ => {
            eprintln!("store_floor: {from:?} is not s3:http(s)://HOST[:PORT]/BUCKET/PREFIX");
            std::process::exit(2);
        }
    };
    let concurrency: usize = concurrency.parse().unwrap_or_else(|_| {
        eprintln!("store_floor: CONCURRENCY {concurrency:?} is not a number");
        std::process::exit(2);
    });
    let credentials = S3Credentials::from_env().unwrap_or_else(|e| {
        eprintln!("store_floor: {e}");
        std::process::exit(2);
    });
    let store: Arc<dyn ObjectStore> = Arc::new(
        AmazonS3Builder::new()
            .with_endpoint(&location.endpoint)
            .with_allow_http(location.endpoint.starts_with("http://"))
            .with_bucket_name(&location.bucket)
            .with_region(&credentials.region)
            .with_access_key_id(&credentials.access_key_id)
            .with_secret_access_key(&credentials.secret_access_key)
            .with_virtual_hosted_style_request(false)
            .build()
            .expect("an S3 client"),
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async move {
        let prefix = Path::from(location.prefix.as_str());
        let listed: Vec<_> = store
            .list(Some(&prefix))
            .try_collect()
            .await
            .expect("the objects are listed");
        let t = Instant::now();
        let objects: Vec<(Path, bytes::Bytes)> = futures_util::stream::iter(listed)
            .map(|m| {
                let store = store.clone();
                async move {
                    let bytes = store.get(&m.location).await?.bytes().await?;
                    Ok::<_, object_store::Error>((m.location, bytes))
                }
            })
            .buffer_unordered(concurrency)
            .try_collect()
            .await
            .expect("every object is read");
        let total: usize = objects.iter().map(|(_, b)| b.len()).sum();
        report("get", objects.len(), total, t);
        let t = Instant::now();
        let prefix_parts = prefix.parts().count();
        futures_util::stream::iter(objects)
            .map(|(p, b)| {
                let store = store.clone();
                let rel: Vec<_> = p.parts().skip(prefix_parts).collect();
                let dest = Path::from_iter(
                    Path::from(to.as_str())
                        .parts()
                        .chain(rel.into_iter().map(|p| p.to_owned())),
                );
                async move { store.put(&dest, PutPayload::from_bytes(b)).await }
            })
            .buffer_unordered(concurrency)
            .try_collect::<Vec<_>>()
            .await
            .expect("every object is written");
        report("put", 0, total, t);
    });
}

fn report(what: &str, objects: usize, bytes: usize, t: Instant) {
    let s = t.elapsed().as_secs_f64();
    let mib = bytes as f64 / (1 << 20) as f64;
    println!(
        "{what}\t{objects}\t{mib:.1}\t{s:.2}\t{:.0}",
        mib / s.max(1e-9)
    );
}

//! Repositories on object storage: a real Ceph cluster (three OSDs, replicated three
//! times, RADOS Gateway for S3) started by the test, never a mock.

use std::os::unix::fs::PermissionsExt;

use haul_repo::backend::{contract, Backend, S3Backend, S3Credentials, S3Location};
use haul_repo::Error;
use haul_tests::ceph::Ceph;
use haul_tests::Env;

fn location(s: &str) -> S3Location {
    S3Location::parse(s).expect("an s3: location").unwrap()
}

#[test]
fn the_s3_backend_keeps_the_backend_contract_on_a_ceph_cluster() {
    let env = Env::new();
    let ceph = Ceph::start(&env.path("ceph"));
    let creds = S3Credentials {
        access_key_id: ceph.access_key.clone(),
        secret_access_key: ceph.secret_key.clone(),
        region: "us-east-1".into(),
    };
    let loc = location(&ceph.bucket("contract", "some/repo"));
    let b = S3Backend::create(&loc, &creds).unwrap();
    contract::conformance(&b);
    assert_eq!(
        b.location(),
        format!("{}/contract/some/repo", ceph.endpoint).replacen("http", "s3:http", 1)
    );

    // A repository's config makes it one: open finds it, create refuses it; a prefix
    // holding other objects is not taken for a new repository; a missing one is named.
    b.write_once(haul_repo::backend::FileType::Config, "config", b"c")
        .or_else(|e| match e {
            Error::AlreadyExists { .. } => Ok(()),
            e => Err(e),
        })
        .unwrap();
    S3Backend::open(&loc, &creds).unwrap();
    assert!(matches!(
        S3Backend::create(&loc, &creds),
        Err(Error::RepositoryExists(_))
    ));
    let parent = location(&ceph.bucket("contract2", "a"));
    let inner = S3Backend::create(&parent.join("b"), &creds).unwrap();
    inner
        .write_once(haul_repo::backend::FileType::Config, "config", b"c")
        .unwrap();
    let e = S3Backend::create(&parent, &creds)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("is not empty"), "{e}");
    let e = S3Backend::open(
        &location(&format!("s3:{}/contract/elsewhere", ceph.endpoint)),
        &creds,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("no haul repository at s3:") && e.contains("/contract/elsewhere"),
        "{e}"
    );

    // A wrong secret is refused by the store, and the error names where.
    let wrong = S3Credentials {
        secret_access_key: "wrong".into(),
        ..creds.clone()
    };
    let e = S3Backend::open(&loc, &wrong).err().unwrap().to_string();
    assert!(e.contains("/contract/some/repo"), "{e}");

    // Credentials from a file, which must be private.
    let file = env.path("s3.env");
    std::fs::write(
        &file,
        format!(
            "# the pbs's key\nAWS_ACCESS_KEY_ID={}\nexport AWS_SECRET_ACCESS_KEY=\"{}\"\n",
            ceph.access_key, ceph.secret_key
        ),
    )
    .unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = S3Credentials::from_file(&file).unwrap_err().to_string();
    assert!(
        e.contains("readable by others") && e.contains("chmod 600"),
        "{e}"
    );
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    S3Backend::open(&loc, &S3Credentials::from_file(&file).unwrap()).unwrap();
}

//! Data survives a restart: accounts, profiles and tokens are read back from LMDB.

mod common;

use common::{TestServer, form, login, register};
use serde_json::json;

#[test]
fn accounts_and_tokens_survive_a_restart() {
    let mut s = TestServer::start(|_| {});
    let mut c = s.client();
    register(&mut c, "keeper", 2, "secret1");
    let (uid, token) = login(&mut c, "keeper", "secret1");
    let r = c.post(
        "/update_profile",
        &form(&[("token", &token), ("occup", "tutor"), ("country", "7")]),
    );
    assert_eq!(r.json()["success"], true);
    drop(c);

    s.restart();
    let mut c = s.client();
    assert_eq!(
        c.get("/check_user_exists?user_name=keeper").json(),
        json!({"result": true})
    );
    let (uid2, _) = login(&mut c, "keeper", "secret1");
    assert_eq!(uid, uid2);
    let v = c.get(&format!("/show_teachers?token={token}")).json();
    assert_eq!(v["result"][0]["Occup"], "tutor");
    assert_eq!(v["result"][0]["Country"], 7);
    // New uids continue after the old ones.
    register(&mut c, "second", 1, "secret1");
    let (uid3, _) = login(&mut c, "second", "secret1");
    assert_eq!(uid3, uid + 1);
}

#[test]
fn data_dir_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let s = TestServer::start(|_| {});
    let mode = std::fs::metadata(&s.config.data_dir)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
}

#[test]
fn tokens_are_stored_only_as_hashes() {
    let mut s = TestServer::start(|_| {});
    let mut c = s.client();
    register(&mut c, "secretive", 1, "hunter22");
    let (_, token) = login(&mut c, "secretive", "hunter22");
    s.stop();
    let mut raw = Vec::new();
    for entry in std::fs::read_dir(&s.config.data_dir).unwrap() {
        raw.extend(std::fs::read(entry.unwrap().path()).unwrap());
    }
    let contains = |needle: &[u8]| raw.windows(needle.len()).any(|w| w == needle);
    assert!(
        contains(b"secretive"),
        "sanity: the data file holds the account"
    );
    assert!(!contains(token.as_bytes()), "the token is on disk in clear");
    assert!(!contains(b"hunter22"), "the password is on disk in clear");
    assert!(contains(b"$argon2id$v=19$m=19456,t=2,p=1$"));
}

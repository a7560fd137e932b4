//! Every endpoint's success and failure answers, compared as JSON, over GET and POST.

mod common;

use common::{TestServer, form, login, register};
use serde_json::json;

#[test]
fn register_validation_and_uniqueness() {
    let s = TestServer::start(|_| {});
    let mut c = s.client();
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[("user_type", "1"), ("pwd", "secret1")],
            "one of user_name, phone or email is required",
        ),
        (
            &[("user_name", "a@b"), ("user_type", "1"), ("pwd", "secret1")],
            "user_name must not contain '@' or control characters",
        ),
        (
            &[
                ("user_name", "+123"),
                ("user_type", "1"),
                ("pwd", "secret1"),
            ],
            "user_name must not be only digits and '+'",
        ),
        (
            &[
                ("user_name", &"x".repeat(31)),
                ("user_type", "1"),
                ("pwd", "secret1"),
            ],
            "user_name must be 1-30 characters",
        ),
        (
            &[("phone", "12ab5"), ("user_type", "1"), ("pwd", "secret1")],
            "phone must be an optional '+' followed by 5-20 digits",
        ),
        (
            &[("email", "nobody"), ("user_type", "1"), ("pwd", "secret1")],
            "email must be at most 100 characters, with one '@' and a dot in the domain",
        ),
        (
            &[("user_name", "ann"), ("user_type", "3"), ("pwd", "secret1")],
            "user_type must be 1 (student) or 2 (teacher)",
        ),
        (
            &[("user_name", "ann"), ("pwd", "secret1")],
            "user_type must be 1 (student) or 2 (teacher)",
        ),
        (
            &[("user_name", "ann"), ("user_type", "1"), ("pwd", "12345")],
            "pwd must be 6-128 characters",
        ),
        (
            &[("user_name", "ann"), ("user_type", "1")],
            "pwd must be 6-128 characters",
        ),
    ];
    for (params, msg) in cases {
        let r = c.get(&format!("/register?{}", form(params)));
        assert_eq!(r.status, 200);
        assert_eq!(
            r.json(),
            json!({"success": false, "msg": msg}),
            "{params:?}"
        );
    }
    let r = c.get(&format!(
        "/register?{}",
        form(&[
            ("user_name", "Ann"),
            ("phone", "+1 555-0100"),
            ("email", "Ann@Example.com"),
            ("user_type", "1"),
            ("pwd", "secret1")
        ])
    ));
    assert_eq!(r.json(), json!({"success": true}));
    assert_eq!(
        r.header("content-type"),
        Some("application/json; charset=utf-8")
    );
    let taken: &[(&[(&str, &str)], &str)] = &[
        (&[("user_name", "aNN")], "user_name already taken"),
        (&[("phone", "+15550100")], "phone already registered"),
        (&[("email", "ANN@example.COM")], "email already registered"),
    ];
    for (id, msg) in taken {
        let mut p = id.to_vec();
        p.extend_from_slice(&[("user_type", "1"), ("pwd", "secret1")]);
        let r = c.post("/register", &form(&p));
        assert_eq!(r.json(), json!({"success": false, "msg": msg}), "{id:?}");
    }
}

#[test]
fn check_user_exists_by_priority() {
    let s = TestServer::start(|_| {});
    let mut c = s.client();
    register(&mut c, "lankc", 1, "secret1");
    let r = c.post(
        "/register",
        &form(&[
            ("phone", "12345678"),
            ("user_type", "2"),
            ("pwd", "secret1"),
        ]),
    );
    assert_eq!(r.json(), json!({"success": true}));
    for (q, want) in [
        ("user_name=LANKC", true),
        ("user_name=nobody", false),
        ("phone=1234-5678", true),
        ("email=lankc%40x.com", false),
        // user_name comes first even when phone would match.
        ("user_name=nobody&phone=12345678", false),
        // An empty field is skipped.
        ("user_name=&phone=12345678", true),
        ("phone=not-a-phone", false),
    ] {
        let r = c.get(&format!("/check_user_exists?{q}"));
        assert_eq!(r.status, 200);
        assert_eq!(r.json(), json!({"result": want}), "{q}");
    }
    let r = c.post("/check_user_exists", "user_name=lankc");
    assert_eq!(r.json(), json!({"result": true}));
    let r = c.get("/check_user_exists");
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json(),
        json!({"success": false, "msg": "one of user_name, phone or email is required"})
    );
}

#[test]
fn login_success_and_failures() {
    let s = TestServer::start(|_| {});
    let mut c = s.client();
    register(&mut c, "lankc", 1, "secret1");
    let r = c.get("/login?user_name=lankc&pwd=secret1&client_id=123");
    let v = r.json();
    let token = v["result"]["token"].as_str().unwrap().to_string();
    assert_eq!(token.len(), 32);
    assert!(token.bytes().all(|b| b.is_ascii_digit()));
    assert_eq!(
        v,
        json!({"success": true, "msg": "", "result": {
            "avatar": "", "token": token, "uid": 1, "uname": "lankc", "gender": 0, "user_type": 1
        }})
    );
    // Key order follows the original server's.
    let text = String::from_utf8(r.body.clone()).unwrap();
    assert!(
        text.starts_with(r#"{"success":true,"msg":"","result":{"avatar":"","token":""#),
        "{text}"
    );

    let r = c.post("/login", "user_name=nobody&pwd=secret1");
    assert_eq!(
        r.json(),
        json!({"success": false, "msg": "user not found", "result": ""})
    );
    let r = c.post("/login", "user_name=lankc&pwd=wrong12");
    assert_eq!(
        r.json(),
        json!({"success": false, "msg": "password error", "result": ""})
    );
    // uname falls back to phone, then email.
    let r = c.post("/register", "email=Only%40Mail.com&user_type=2&pwd=secret1");
    assert_eq!(r.json(), json!({"success": true}));
    let v = c.post("/login", "email=only%40mail.com&pwd=secret1").json();
    assert_eq!(v["result"]["uname"], "only@mail.com");
    assert_eq!(v["result"]["user_type"], 2);
    // Each login issues a new token.
    let (_, t1) = login(&mut c, "lankc", "secret1");
    let (_, t2) = login(&mut c, "lankc", "secret1");
    assert_ne!(t1, t2);
}

#[test]
fn login_throttled_after_five_wrong_passwords() {
    let s = TestServer::start(|_| {});
    let mut c = s.client();
    register(&mut c, "lankc", 1, "secret1");
    for _ in 0..5 {
        let r = c.post("/login", "user_name=lankc&pwd=wrong12");
        assert_eq!(r.json()["msg"], "password error");
    }
    // Even the right password is refused now, without being checked.
    let r = c.post("/login", "user_name=lankc&pwd=secret1");
    assert_eq!(
        r.json(),
        json!({"success": false, "msg": "too many attempts, retry later", "result": ""})
    );
}

#[test]
fn logout_refresh_and_token_rules() {
    let s = TestServer::start(|_| {});
    let mut c = s.client();
    register(&mut c, "lankc", 1, "secret1");
    register(&mut c, "teacher_1", 2, "secret1");
    let (_, token) = login(&mut c, "lankc", "secret1");

    let r = c.get(&format!("/show_teachers?token={token}"));
    assert_eq!(r.status, 200);

    // Refresh needs the client_id the token was issued to.
    let r = c.get(&format!("/refresh_token?token={token}&client_id=999"));
    assert_eq!(
        r.json(),
        json!({"success": false, "msg": "invalid token", "result": ""})
    );
    let r = c.get(&format!("/refresh_token?token={token}&client_id=123"));
    let v = r.json();
    assert_eq!(v["success"], true);
    assert_eq!(v["msg"], "");
    let fresh = v["result"].as_str().unwrap().to_string();
    assert_eq!(fresh.len(), 32);
    // The old token is revoked, the new one works.
    let r = c.get(&format!("/show_teachers?token={token}"));
    assert_eq!(r.status, 403);
    assert_eq!(r.json(), json!({"success": false, "msg": "invalid token"}));
    let r = c.get(&format!("/refresh_token?token={token}&client_id=123"));
    assert_eq!(r.json()["msg"], "invalid token");
    assert_eq!(c.get_bearer("/show_teachers", &fresh).status, 200);

    // Logout always succeeds and revokes.
    let r = c.post("/logout", &format!("token={fresh}"));
    assert_eq!(r.json(), json!({"success": true, "msg": "", "rs": ""}));
    assert_eq!(c.get_bearer("/show_teachers", &fresh).status, 403);
    let r = c.get("/logout?token=garbage");
    assert_eq!(r.json(), json!({"success": true, "msg": "", "rs": ""}));
    let r = c.get("/logout");
    assert_eq!(r.json(), json!({"success": true, "msg": "", "rs": ""}));
}

#[test]
fn tokens_expire_and_stay_refreshable() {
    let s = TestServer::start(|c| c.token_ttl = std::time::Duration::from_millis(300));
    let mut c = s.client();
    register(&mut c, "lankc", 1, "secret1");
    let (_, token) = login(&mut c, "lankc", "secret1");
    assert_eq!(c.get(&format!("/show_teachers?token={token}")).status, 200);
    assert!(common::wait_until(common::ANSWER_TIMEOUT, || {
        c.get(&format!("/show_teachers?token={token}")).status == 403
    }));
    // Expired, but within the 30-day grace: refreshable once.
    let v = c
        .get(&format!("/refresh_token?token={token}&client_id=123"))
        .json();
    assert_eq!(v["success"], true, "{v}");
}

#[test]
fn at_most_sixteen_tokens_per_user() {
    let s = TestServer::start(|_| {});
    let mut c = s.client();
    register(&mut c, "lankc", 1, "secret1");
    let tokens: Vec<String> = (0..17)
        .map(|_| login(&mut c, "lankc", "secret1").1)
        .collect();
    assert_eq!(
        c.get(&format!("/show_teachers?token={}", tokens[0])).status,
        403
    );
    for t in &tokens[1..] {
        assert_eq!(c.get(&format!("/show_teachers?token={t}")).status, 200);
    }
}

#[test]
fn show_teachers_lists_profiles_and_pages() {
    let s = TestServer::start(|_| {});
    let mut c = s.client();
    register(&mut c, "student", 1, "secret1");
    for i in 1..=3 {
        register(&mut c, &format!("teacher_{i}"), 2, "secret1");
    }
    let (_, tok) = login(&mut c, "teacher_2", "secret1");
    let r = c.post(
        "/update_profile",
        &form(&[
            ("token", &tok),
            ("gender", "2"),
            ("country", "86"),
            ("description", "Mandarin, 10 years"),
            ("interest", "music"),
            ("occup", "teacher"),
            ("avatar", "https://cdn.example/a.png"),
            ("audio", "https://cdn.example/a.mp3"),
        ]),
    );
    assert_eq!(r.json(), json!({"success": true, "msg": ""}));

    let r = c.get(&format!("/show_teachers?token={tok}"));
    let blank = |uid: u64, name: &str| {
        json!({"Audio": "", "Avatar": "", "Country": 0, "Description": "", "Gender": 0,
               "Interest": "", "Occup": "", "Uid": uid, "Uname": name})
    };
    assert_eq!(
        r.json(),
        json!({"result": [
            blank(2, "teacher_1"),
            {"Audio": "https://cdn.example/a.mp3", "Avatar": "https://cdn.example/a.png",
             "Country": 86, "Description": "Mandarin, 10 years", "Gender": 2,
             "Interest": "music", "Occup": "teacher", "Uid": 3, "Uname": "teacher_2"},
            blank(4, "teacher_3"),
        ]})
    );
    let r = c.get(&format!("/show_teachers?token={tok}&offset=1&limit=1"));
    assert_eq!(r.json()["result"].as_array().unwrap().len(), 1);
    assert_eq!(r.json()["result"][0]["Uid"], 3);
    let r = c.get(&format!("/show_teachers?token={tok}&offset=x"));
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json(),
        json!({"success": false, "msg": "offset must be a non-negative integer"})
    );
    for q in [
        "",
        "token=",
        "token=12345678901234567890123456789012",
        "token=abc",
    ] {
        let r = c.get(&format!("/show_teachers?{q}"));
        assert_eq!(r.status, 403, "{q}");
        assert_eq!(r.json(), json!({"success": false, "msg": "invalid token"}));
    }
    // Login reports the profile's avatar and gender.
    let v = c.post("/login", "user_name=teacher_2&pwd=secret1").json();
    assert_eq!(v["result"]["avatar"], "https://cdn.example/a.png");
    assert_eq!(v["result"]["gender"], 2);
}

#[test]
fn update_profile_validation() {
    let s = TestServer::start(|_| {});
    let mut c = s.client();
    register(&mut c, "lankc", 1, "secret1");
    let (_, tok) = login(&mut c, "lankc", "secret1");
    let long = "x".repeat(201);
    let cases: &[(&str, &str, &str)] = &[
        ("gender", "3", "gender must be 0, 1 or 2"),
        ("country", "abc", "country must be an integer"),
        (
            "description",
            &long,
            "description must be at most 200 characters",
        ),
        ("interest", &long, "interest must be at most 100 characters"),
        ("occup", &long, "occup must be at most 20 characters"),
        (
            "avatar",
            "javascript:alert(1)",
            "avatar must be an http(s) URL of at most 255 characters",
        ),
        (
            "audio",
            "ftp://x/y",
            "audio must be an http(s) URL of at most 255 characters",
        ),
    ];
    for (k, v, msg) in cases {
        let r = c.post("/update_profile", &form(&[("token", &tok), (k, v)]));
        assert_eq!(r.json(), json!({"success": false, "msg": msg}), "{k}");
    }
    let r = c.post("/update_profile", "gender=1");
    assert_eq!(r.status, 403);
    assert_eq!(r.json(), json!({"success": false, "msg": "invalid token"}));
}

#[test]
fn bad_encoding_and_routing_errors() {
    let s = TestServer::start(|_| {});
    let mut c = s.client();
    let r = c.get("/health");
    assert_eq!(r.json(), json!({"status": "ok"}));
    for (q, msg) in [
        ("user_name=%zz", "bad percent-encoding in parameters"),
        ("user_name=%E5%AD", "parameters are not valid UTF-8"),
    ] {
        let r = c.get(&format!("/check_user_exists?{q}"));
        assert_eq!(r.status, 400, "{q}");
        assert_eq!(r.json(), json!({"success": false, "msg": msg}));
    }
    let r = c.get("/no/such/thing");
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["success"], false);
    c.send(b"DELETE /login HTTP/1.1\r\nHost: t\r\n\r\n");
    let r = c.read_response();
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, POST"));
    c.send(
        b"POST /login HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
    );
    let r = c.read_response();
    assert_eq!(r.status, 415);
    // The connection survived all of these.
    assert_eq!(c.get("/health").status, 200);
}

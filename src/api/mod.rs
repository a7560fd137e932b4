//! The account API as plain functions of (store, request) -> action; no sockets here.
//!
//! A request either gets its answer at once ([`Action::Respond`]) or needs work off the reactor:
//! a password job ([`Action::Auth`]) or a durable write ([`Action::Write`]). The caller runs that
//! work, then feeds the result back through [`Api::after_auth`] / [`Api::after_write`] with the
//! [`Pending`] state it was given, until a response comes out.

pub mod validate;

use serde::Serialize;

use crate::auth::{self, Task, Verdict};
use crate::http::{FormError, Method, Params, Request, Response, Status};
use crate::store::writer::TokenPolicy;
use crate::store::{
    IdKind, NewUser, ProfileChanges, Store, StoreError, TokenRecord, WriteOp, WriteOutcome,
};

/// API rules, from [`crate::config::Config`].
#[derive(Debug, Clone, Copy)]
pub struct ApiConfig {
    pub token_ttl_ms: u64,
    pub refresh_grace_ms: u64,
    pub max_tokens_per_user: usize,
    pub max_teachers_page: usize,
}

impl From<&crate::config::Config> for ApiConfig {
    fn from(config: &crate::config::Config) -> ApiConfig {
        ApiConfig {
            token_ttl_ms: config.token_ttl.as_millis() as u64,
            refresh_grace_ms: config.refresh_grace.as_millis() as u64,
            max_tokens_per_user: config.max_tokens_per_user,
            max_teachers_page: config.max_teachers_page,
        }
    }
}

/// What to do with a request.
#[derive(Debug)]
pub enum Action {
    Respond(Response),
    Auth(Task, Pending),
    Write(WriteOp, Pending),
}

/// What a request waiting on off-reactor work still needs to finish.
#[derive(Debug)]
pub enum Pending {
    /// Waiting for the password hash.
    Register(NewUser),
    /// Waiting for the account to be committed.
    Registering,
    Login(Box<LoginInfo>),
    Logout {
        token_hash: [u8; 32],
    },
    Refresh {
        client_id: String,
        old_hash: [u8; 32],
        token: String,
    },
    UpdateProfile,
}

/// The account details a successful login returns.
#[derive(Clone)]
pub struct LoginInfo {
    pub uid: u64,
    pub client_id: String,
    pub uname: String,
    pub avatar: String,
    pub gender: u8,
    pub user_type: u8,
    pub token: String,
}

/// A WebSocket upgrade that may proceed: whose connection it is and under which token.
#[derive(Debug, Clone)]
pub struct WsGrant {
    pub uid: u64,
    pub token_hash: [u8; 32],
    /// `acks=1`: the client wants an ACK frame for each frame it sends.
    pub acks: bool,
}

/// The endpoints, over one store handle (each worker has its own `Api`).
#[derive(Clone)]
pub struct Api {
    store: Store,
    config: ApiConfig,
}

const MSG_STORAGE: &str = "storage error, retry later";
const MSG_INVALID_TOKEN: &str = "invalid token";

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn storage_error(e: StoreError) -> Action {
    log::error!("read failed: {e}");
    Action::Respond(Response::error(Status::InternalError, MSG_STORAGE))
}

fn json(value: &impl Serialize) -> Response {
    Response::ok(serde_json::to_vec(value).expect("API bodies always serialize"))
}

fn failure(msg: &str) -> Response {
    Response::error(Status::Ok, msg)
}

#[derive(Serialize)]
struct WithResult<'a, T: Serialize> {
    success: bool,
    msg: &'a str,
    result: T,
}

fn result_failure(msg: &str) -> Response {
    json(&WithResult {
        success: false,
        msg,
        result: "",
    })
}

/// Routes known to the API (the WebSocket endpoint is taken before this, by the connection).
pub const ROUTES: &[&str] = &[
    "/register",
    "/check_user_exists",
    "/login",
    "/logout",
    "/refresh_token",
    "/show_teachers",
    "/update_profile",
    "/health",
];

impl Api {
    pub fn new(store: Store, config: ApiConfig) -> Api {
        Api { store, config }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    fn policy(&self) -> TokenPolicy {
        TokenPolicy {
            now_ms: now_ms(),
            ttl_ms: self.config.token_ttl_ms,
            grace_ms: self.config.refresh_grace_ms,
            max_per_user: self.config.max_tokens_per_user,
        }
    }

    /// Routes and serves one request.
    pub fn handle(&self, req: &Request<'_>) -> Action {
        if !ROUTES.contains(&req.path) {
            return Action::Respond(Response::error(Status::NotFound, "no such endpoint"));
        }
        if req.method == Method::Other {
            return Action::Respond(Response::error(
                Status::MethodNotAllowed,
                "method not allowed; use GET or POST",
            ));
        }
        let body = if req.method == Method::Post && !req.body.is_empty() {
            if !req.form_body {
                return Action::Respond(Response::error(
                    Status::UnsupportedMediaType,
                    "body must be application/x-www-form-urlencoded",
                ));
            }
            Some(req.body)
        } else {
            None
        };
        let params = match Params::decode(req.query, body) {
            Ok(p) => p,
            Err(e) => return Action::Respond(bad_params(e)),
        };
        match req.path {
            "/check_user_exists" => self.check_user_exists(&params),
            "/register" => self.register(&params),
            "/login" => self.login(&params),
            "/logout" => self.logout(&params, req.bearer),
            "/refresh_token" => self.refresh_token(&params, req.bearer),
            "/show_teachers" => self.show_teachers(&params, req.bearer),
            "/update_profile" => self.update_profile(&params, req.bearer),
            _ => Action::Respond(Response::ok(&br#"{"status":"ok"}"#[..])),
        }
    }

    /// The first non-empty identifier by priority, normalized like at registration.
    /// `Ok(None)`: none given. `Err(())`: given but cannot exist (invalid shape).
    fn identifier(params: &Params<'_>) -> Option<Result<(IdKind, String), ()>> {
        if let Some(v) = params.non_empty("user_name") {
            return Some(Ok((IdKind::UserName, validate::user_name_key(v))));
        }
        if let Some(v) = params.non_empty("phone") {
            return Some(
                validate::phone(v)
                    .map(|p| (IdKind::Phone, p))
                    .map_err(|_| ()),
            );
        }
        if let Some(v) = params.non_empty("email") {
            return Some(
                validate::email(v)
                    .map(|e| (IdKind::Email, e))
                    .map_err(|_| ()),
            );
        }
        None
    }

    fn check_user_exists(&self, params: &Params<'_>) -> Action {
        let found = match Self::identifier(params) {
            None => {
                return Action::Respond(Response::error(
                    Status::BadRequest,
                    "one of user_name, phone or email is required",
                ));
            }
            Some(Err(())) => false,
            Some(Ok((kind, key))) => match self.store.read().and_then(|r| r.uid_by(kind, &key)) {
                Ok(uid) => uid.is_some(),
                Err(e) => return storage_error(e),
            },
        };
        Action::Respond(Response::ok(if found {
            &br#"{"result":true}"#[..]
        } else {
            &br#"{"result":false}"#[..]
        }))
    }

    fn register(&self, params: &Params<'_>) -> Action {
        match self.new_user(params) {
            Ok(user) => Action::Auth(
                Task::Hash {
                    pwd: params.get("pwd").unwrap_or("").to_string(),
                },
                Pending::Register(user),
            ),
            Err(msg) => Action::Respond(failure(msg)),
        }
    }

    /// Validates a registration and rejects identifiers already taken before paying for a
    /// password hash; the writer checks again inside its transaction.
    fn new_user(&self, params: &Params<'_>) -> Result<NewUser, &'static str> {
        let user_name = params.non_empty("user_name");
        let phone = params.non_empty("phone");
        let email = params.non_empty("email");
        if user_name.is_none() && phone.is_none() && email.is_none() {
            return Err("one of user_name, phone or email is required");
        }
        if let Some(n) = user_name {
            validate::user_name(n)?;
        }
        let phone = phone.map(validate::phone).transpose()?;
        let email = email.map(validate::email).transpose()?;
        let user_type = validate::user_type(params.get("user_type"))?;
        validate::pwd(params.get("pwd").unwrap_or(""))?;
        let user = NewUser {
            user_name: user_name.map(str::to_string),
            name_key: user_name.map(validate::user_name_key),
            phone,
            email,
            user_type,
            pwd_hash: String::new(),
            now_ms: now_ms(),
        };
        let reader = self.store.read().map_err(|e| {
            log::error!("read failed: {e}");
            MSG_STORAGE
        })?;
        let checks = [
            (IdKind::UserName, &user.name_key),
            (IdKind::Phone, &user.phone),
            (IdKind::Email, &user.email),
        ];
        for (kind, key) in checks {
            if let Some(key) = key
                && reader.uid_by(kind, key).ok().flatten().is_some()
            {
                return Err(taken_msg(kind));
            }
        }
        Ok(user)
    }

    fn login(&self, params: &Params<'_>) -> Action {
        let not_found = || Action::Respond(result_failure("user not found"));
        let (kind, key) = match Self::identifier(params) {
            Some(Ok(id)) => id,
            _ => return not_found(),
        };
        let reader = match self.store.read() {
            Ok(r) => r,
            Err(e) => return storage_error(e),
        };
        let user = match reader.uid_by(kind, &key).and_then(|uid| match uid {
            Some(uid) => reader.user(uid),
            None => Ok(None),
        }) {
            Ok(Some(u)) => u,
            Ok(None) => return not_found(),
            Err(e) => return storage_error(e),
        };
        let pwd = params.get("pwd").unwrap_or("");
        if pwd.is_empty() {
            return Action::Respond(result_failure("password error"));
        }
        Action::Auth(
            Task::Verify {
                uid: user.uid,
                phc: user.pwd_hash.clone(),
                pwd: pwd.to_string(),
            },
            Pending::Login(Box::new(LoginInfo {
                uid: user.uid,
                client_id: params.get("client_id").unwrap_or("").to_string(),
                uname: user.uname().to_string(),
                avatar: user.profile.avatar.clone(),
                gender: user.profile.gender,
                user_type: user.user_type,
                token: String::new(),
            })),
        )
    }

    fn token_param<'p>(params: &'p Params<'_>, bearer: Option<&'p str>) -> Option<&'p str> {
        params.non_empty("token").or(bearer)
    }

    /// The live token record for the request's token, if any.
    fn authenticate(
        &self,
        params: &Params<'_>,
        bearer: Option<&str>,
    ) -> Result<Option<TokenRecord>, StoreError> {
        let Some(token) = Self::token_param(params, bearer).filter(|t| auth::token::well_formed(t))
        else {
            return Ok(None);
        };
        let record = self.store.read()?.token(&auth::token::hash(token))?;
        Ok(record.filter(|r| r.is_live(now_ms())))
    }

    fn logout(&self, params: &Params<'_>, bearer: Option<&str>) -> Action {
        match Self::token_param(params, bearer).filter(|t| auth::token::well_formed(t)) {
            Some(token) => {
                let token_hash = auth::token::hash(token);
                Action::Write(
                    WriteOp::Revoke { token_hash },
                    Pending::Logout { token_hash },
                )
            }
            None => Action::Respond(logout_ok()),
        }
    }

    fn refresh_token(&self, params: &Params<'_>, bearer: Option<&str>) -> Action {
        let Some(token) = Self::token_param(params, bearer).filter(|t| auth::token::well_formed(t))
        else {
            return Action::Respond(result_failure(MSG_INVALID_TOKEN));
        };
        let client_id = params.get("client_id").unwrap_or("").to_string();
        self.refresh_write(client_id, auth::token::hash(token))
    }

    fn refresh_write(&self, client_id: String, old_hash: [u8; 32]) -> Action {
        let token = match auth::token::generate() {
            Ok(t) => t,
            Err(e) => return rng_failure(e),
        };
        Action::Write(
            WriteOp::Refresh {
                old_hash,
                client_id: client_id.clone(),
                new_hash: auth::token::hash(&token),
                policy: self.policy(),
            },
            Pending::Refresh {
                client_id,
                old_hash,
                token,
            },
        )
    }

    fn show_teachers(&self, params: &Params<'_>, bearer: Option<&str>) -> Action {
        match self.authenticate(params, bearer) {
            Ok(Some(_)) => {}
            Ok(None) => return Action::Respond(invalid_token()),
            Err(e) => return storage_error(e),
        }
        let number = |key: &str, default: usize| match params.non_empty(key) {
            None => Ok(default),
            Some(v) => v.parse::<usize>().map_err(|_| key.to_string()),
        };
        let max = self.config.max_teachers_page;
        let (offset, limit) = match (number("offset", 0), number("limit", max)) {
            (Ok(o), Ok(l)) => (o, l.min(max)),
            (Err(k), _) | (_, Err(k)) => {
                return Action::Respond(Response::error(
                    Status::BadRequest,
                    &format!("{k} must be a non-negative integer"),
                ));
            }
        };
        let teachers = match self.store.read().and_then(|r| r.teachers(offset, limit)) {
            Ok(t) => t,
            Err(e) => return storage_error(e),
        };
        #[derive(Serialize)]
        #[serde(rename_all = "PascalCase")]
        struct Teacher<'a> {
            audio: &'a str,
            avatar: &'a str,
            country: i64,
            description: &'a str,
            gender: u8,
            interest: &'a str,
            occup: &'a str,
            uid: u64,
            uname: &'a str,
        }
        #[derive(Serialize)]
        struct Teachers<'a> {
            result: Vec<Teacher<'a>>,
        }
        let result = teachers
            .iter()
            .map(|u| Teacher {
                audio: &u.profile.audio,
                avatar: &u.profile.avatar,
                country: u.profile.country,
                description: &u.profile.description,
                gender: u.profile.gender,
                interest: &u.profile.interest,
                occup: &u.profile.occup,
                uid: u.uid,
                uname: u.uname(),
            })
            .collect();
        Action::Respond(json(&Teachers { result }))
    }

    fn update_profile(&self, params: &Params<'_>, bearer: Option<&str>) -> Action {
        let uid = match self.authenticate(params, bearer) {
            Ok(Some(t)) => t.uid,
            Ok(None) => return Action::Respond(invalid_token()),
            Err(e) => return storage_error(e),
        };
        match profile_changes(params) {
            Ok(changes) => Action::Write(
                WriteOp::UpdateProfile { uid, changes },
                Pending::UpdateProfile,
            ),
            Err(msg) => Action::Respond(failure(msg)),
        }
    }

    /// Checks the token of a `/wsconn` upgrade (query `token` or `Authorization: Bearer`).
    pub fn authorize_ws(&self, req: &Request<'_>) -> Result<WsGrant, Response> {
        let params = Params::decode(req.query, None).map_err(bad_params)?;
        let token = Self::token_param(&params, req.bearer)
            .filter(|t| auth::token::well_formed(t))
            .ok_or_else(invalid_token)?;
        let token_hash = auth::token::hash(token);
        let record = self
            .store
            .read()
            .and_then(|r| r.token(&token_hash))
            .map_err(|e| {
                log::error!("read failed: {e}");
                Response::error(Status::InternalError, MSG_STORAGE)
            })?;
        match record {
            Some(r) if r.is_live(now_ms()) => Ok(WsGrant {
                uid: r.uid,
                token_hash,
                acks: params.get("acks") == Some("1"),
            }),
            _ => Err(invalid_token()),
        }
    }

    /// Tokens a committed write revoked, with their owners: their WebSocket connections must
    /// be closed (logout, refresh, the per-user token limit).
    pub fn revoked_tokens(outcome: &WriteOutcome, pending: &Pending) -> Vec<(u64, [u8; 32])> {
        match (outcome, pending) {
            (WriteOutcome::Revoked { uid: Some(uid) }, Pending::Logout { token_hash }) => {
                vec![(*uid, *token_hash)]
            }
            (WriteOutcome::Refreshed { uid }, Pending::Refresh { old_hash, .. }) => {
                vec![(*uid, *old_hash)]
            }
            (WriteOutcome::TokenIssued { uid, revoked }, _) => {
                revoked.iter().map(|h| (*uid, *h)).collect()
            }
            _ => Vec::new(),
        }
    }

    /// Continues a request after its password job.
    pub fn after_auth(&self, verdict: Verdict, pending: Pending) -> Action {
        match (verdict, pending) {
            (Verdict::Hashed(phc), Pending::Register(mut user)) => {
                user.pwd_hash = phc;
                Action::Write(WriteOp::Register(user), Pending::Registering)
            }
            (Verdict::Valid, Pending::Login(info)) => self.issue_token(info),
            (Verdict::Invalid, Pending::Login(_)) => {
                Action::Respond(result_failure("password error"))
            }
            (Verdict::Throttled, Pending::Login(_)) => {
                Action::Respond(result_failure("too many attempts, retry later"))
            }
            (verdict, pending) => {
                log::error!("password job failed ({verdict:?} for {})", pending.kind());
                Action::Respond(Response::error(
                    Status::InternalError,
                    "password processing failed",
                ))
            }
        }
    }

    fn issue_token(&self, mut info: Box<LoginInfo>) -> Action {
        info.token = match auth::token::generate() {
            Ok(t) => t,
            Err(e) => return rng_failure(e),
        };
        Action::Write(
            WriteOp::IssueToken {
                uid: info.uid,
                client_id: info.client_id.clone(),
                token_hash: auth::token::hash(&info.token),
                policy: self.policy(),
            },
            Pending::Login(info),
        )
    }

    /// Continues a request after its write was committed.
    pub fn after_write(&self, outcome: WriteOutcome, pending: Pending) -> Action {
        let respond = Action::Respond;
        match (outcome, pending) {
            (WriteOutcome::Failed(_), _) => {
                respond(Response::error(Status::ServiceUnavailable, MSG_STORAGE))
            }
            (WriteOutcome::Registered { .. }, Pending::Registering) => {
                respond(Response::ok(&br#"{"success":true}"#[..]))
            }
            (WriteOutcome::Taken(kind), Pending::Registering) => respond(failure(taken_msg(kind))),
            (WriteOutcome::TokenIssued { .. }, Pending::Login(info)) => {
                #[derive(Serialize)]
                struct LoginResult<'a> {
                    avatar: &'a str,
                    token: &'a str,
                    uid: u64,
                    uname: &'a str,
                    gender: u8,
                    user_type: u8,
                }
                respond(json(&WithResult {
                    success: true,
                    msg: "",
                    result: LoginResult {
                        avatar: &info.avatar,
                        token: &info.token,
                        uid: info.uid,
                        uname: &info.uname,
                        gender: info.gender,
                        user_type: info.user_type,
                    },
                }))
            }
            (WriteOutcome::TokenCollision, Pending::Login(info)) => self.issue_token(info),
            (WriteOutcome::NoSuchUser, Pending::Login(_)) => {
                respond(result_failure("user not found"))
            }
            (WriteOutcome::Revoked { .. }, Pending::Logout { .. }) => respond(logout_ok()),
            (WriteOutcome::Refreshed { .. }, Pending::Refresh { token, .. }) => {
                respond(json(&WithResult {
                    success: true,
                    msg: "",
                    result: token.as_str(),
                }))
            }
            (
                WriteOutcome::TokenCollision,
                Pending::Refresh {
                    client_id,
                    old_hash,
                    ..
                },
            ) => self.refresh_write(client_id, old_hash),
            (WriteOutcome::RefreshDenied, Pending::Refresh { .. }) => {
                respond(result_failure(MSG_INVALID_TOKEN))
            }
            (WriteOutcome::ProfileUpdated, Pending::UpdateProfile) => {
                respond(Response::ok(&br#"{"success":true,"msg":""}"#[..]))
            }
            (WriteOutcome::NoSuchUser, Pending::UpdateProfile) => respond(invalid_token()),
            (outcome, pending) => {
                log::error!(
                    "unexpected write outcome {outcome:?} for {}",
                    pending.kind()
                );
                respond(Response::error(Status::InternalError, MSG_STORAGE))
            }
        }
    }
}

impl std::fmt::Debug for LoginInfo {
    /// Leaves the token out: logs must not carry secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginInfo")
            .field("uid", &self.uid)
            .finish_non_exhaustive()
    }
}

impl Pending {
    /// The endpoint this belongs to, for logs (never the secrets it carries).
    pub fn kind(&self) -> &'static str {
        match self {
            Pending::Register(_) | Pending::Registering => "register",
            Pending::Login(_) => "login",
            Pending::Logout { .. } => "logout",
            Pending::Refresh { .. } => "refresh_token",
            Pending::UpdateProfile => "update_profile",
        }
    }
}

fn taken_msg(kind: IdKind) -> &'static str {
    match kind {
        IdKind::UserName => "user_name already taken",
        IdKind::Phone => "phone already registered",
        IdKind::Email => "email already registered",
    }
}

fn bad_params(e: FormError) -> Response {
    Response::error(Status::BadRequest, e.msg())
}

fn invalid_token() -> Response {
    Response::error(Status::Forbidden, MSG_INVALID_TOKEN)
}

fn logout_ok() -> Response {
    Response::ok(&br#"{"success":true,"msg":"","rs":""}"#[..])
}

fn rng_failure(e: getrandom::Error) -> Action {
    log::error!("OS random number generator failed: {e}");
    Action::Respond(Response::error(
        Status::InternalError,
        "token generation failed",
    ))
}

fn profile_changes(params: &Params<'_>) -> Result<ProfileChanges, &'static str> {
    let mut c = ProfileChanges::default();
    if let Some(v) = params.non_empty("gender") {
        c.gender = Some(match v {
            "0" => 0,
            "1" => 1,
            "2" => 2,
            _ => return Err("gender must be 0, 1 or 2"),
        });
    }
    if let Some(v) = params.non_empty("country") {
        c.country = Some(v.parse().map_err(|_| "country must be an integer")?);
    }
    if let Some(v) = params.get("description") {
        c.description = Some(validate::text(
            v,
            validate::MAX_DESCRIPTION_CHARS,
            "description must be at most 200 characters",
        )?);
    }
    if let Some(v) = params.get("interest") {
        c.interest = Some(validate::text(
            v,
            validate::MAX_INTEREST_CHARS,
            "interest must be at most 100 characters",
        )?);
    }
    if let Some(v) = params.get("occup") {
        c.occup = Some(validate::text(
            v,
            validate::MAX_OCCUP_CHARS,
            "occup must be at most 20 characters",
        )?);
    }
    if let Some(v) = params.get("avatar") {
        c.avatar = Some(validate::url(
            v,
            "avatar must be an http(s) URL of at most 255 characters",
        )?);
    }
    if let Some(v) = params.get("audio") {
        c.audio = Some(validate::url(
            v,
            "audio must be an http(s) URL of at most 255 characters",
        )?);
    }
    Ok(c)
}

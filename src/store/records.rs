//! What the databases hold: user records (JSON, so fields can be added without a migration) and
//! token records (a fixed big-endian layout, read on every authenticated request).

use serde::{Deserialize, Serialize};

use super::StoreError;

/// The profile fields `/update_profile` sets and `/show_teachers` lists.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    pub gender: u8,
    pub country: i64,
    pub description: String,
    pub interest: String,
    pub occup: String,
    pub avatar: String,
    pub audio: String,
}

/// One account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    pub uid: u64,
    /// As registered (case kept); the index holds the lowercased form.
    pub user_name: Option<String>,
    /// Normalized (spaces and dashes removed).
    pub phone: Option<String>,
    /// Lowercased.
    pub email: Option<String>,
    /// 1 student, 2 teacher.
    pub user_type: u8,
    /// argon2id PHC string.
    pub pwd_hash: String,
    pub created_ms: u64,
    #[serde(default)]
    pub profile: Profile,
}

impl UserRecord {
    /// The display name: user_name, else phone, else email.
    pub fn uname(&self) -> &str {
        self.user_name
            .as_deref()
            .or(self.phone.as_deref())
            .or(self.email.as_deref())
            .unwrap_or("")
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("user record fields always serialize")
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<UserRecord, StoreError> {
        serde_json::from_slice(bytes).map_err(|_| StoreError::Corrupt("users"))
    }
}

/// One issued token, stored under BLAKE3(token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    pub uid: u64,
    pub issued_ms: u64,
    pub expires_ms: u64,
    /// The `client_id` given at login ("" when none); `/refresh_token` must present the same.
    pub client_id: String,
}

const TOKEN_FIXED: usize = 24;

impl TokenRecord {
    /// Usable for authentication at `now_ms`.
    pub fn is_live(&self, now_ms: u64) -> bool {
        now_ms < self.expires_ms
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(TOKEN_FIXED + self.client_id.len());
        out.extend_from_slice(&self.uid.to_be_bytes());
        out.extend_from_slice(&self.issued_ms.to_be_bytes());
        out.extend_from_slice(&self.expires_ms.to_be_bytes());
        out.extend_from_slice(self.client_id.as_bytes());
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<TokenRecord, StoreError> {
        let corrupt = || StoreError::Corrupt("tokens");
        if bytes.len() < TOKEN_FIXED {
            return Err(corrupt());
        }
        let word = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
            u64::from_be_bytes(b)
        };
        let client_id = std::str::from_utf8(&bytes[TOKEN_FIXED..]).map_err(|_| corrupt())?;
        Ok(TokenRecord {
            uid: word(0),
            issued_ms: word(1),
            expires_ms: word(2),
            client_id: client_id.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_record_round_trips() {
        let t = TokenRecord {
            uid: 42,
            issued_ms: 1,
            expires_ms: u64::MAX,
            client_id: "123".into(),
        };
        assert_eq!(TokenRecord::decode(&t.encode()).unwrap(), t);
        assert!(TokenRecord::decode(&[0; 23]).is_err());
    }

    #[test]
    fn uname_priority() {
        let mut u = UserRecord {
            uid: 1,
            user_name: None,
            phone: Some("+12345".into()),
            email: Some("a@b.c".into()),
            user_type: 1,
            pwd_hash: String::new(),
            created_ms: 0,
            profile: Profile::default(),
        };
        assert_eq!(u.uname(), "+12345");
        u.phone = None;
        assert_eq!(u.uname(), "a@b.c");
        u.user_name = Some("Lankc".into());
        assert_eq!(u.uname(), "Lankc");
    }
}

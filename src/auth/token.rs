//! Login tokens: 32 decimal digits (the original clients' shape) from the OS CSPRNG, stored and
//! looked up only as their BLAKE3 hash.

/// Digits in a token.
pub const TOKEN_DIGITS: usize = 32;
const TEN_POW_32: u128 = 10u128.pow(TOKEN_DIGITS as u32);
/// Largest multiple of 10^32 that fits in a u128; draws at or above it are rejected so every
/// token is equally likely (about 106.3 bits of entropy).
const ACCEPT_BELOW: u128 = (u128::MAX / TEN_POW_32) * TEN_POW_32;

/// A fresh token.
pub fn generate() -> Result<String, getrandom::Error> {
    loop {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes)?;
        let n = u128::from_be_bytes(bytes);
        if n < ACCEPT_BELOW {
            return Ok(format!("{:032}", n % TEN_POW_32));
        }
    }
}

/// The key a token is stored under.
pub fn hash(token: &str) -> [u8; 32] {
    *blake3::hash(token.as_bytes()).as_bytes()
}

/// Whether a string has the shape of a token (cheap check before any lookup).
pub fn well_formed(token: &str) -> bool {
    token.len() == TOKEN_DIGITS && token.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_32_digits_and_distinct() {
        let a = generate().unwrap();
        let b = generate().unwrap();
        assert!(well_formed(&a), "{a}");
        assert_ne!(a, b);
        assert_ne!(hash(&a), hash(&b));
        assert!(!well_formed("123"));
    }
}

//! Identifier normalization and field validation, shared by registration and lookups so that a
//! name is found the same way it was stored.

/// Most characters in a user_name.
pub const MAX_USER_NAME_CHARS: usize = 30;
/// Phone digits allowed (after an optional `+`).
pub const PHONE_DIGITS: std::ops::RangeInclusive<usize> = 5..=20;
/// Most characters in an email address.
pub const MAX_EMAIL_CHARS: usize = 100;
/// Password length in characters.
pub const PWD_CHARS: std::ops::RangeInclusive<usize> = 6..=128;
/// Profile field limits, in characters.
pub const MAX_DESCRIPTION_CHARS: usize = 200;
pub const MAX_INTEREST_CHARS: usize = 100;
pub const MAX_OCCUP_CHARS: usize = 20;
pub const MAX_URL_CHARS: usize = 255;

/// A user_name as given, checked; the index key is its lowercase form.
pub fn user_name(v: &str) -> Result<(), &'static str> {
    let n = v.chars().count();
    if n == 0 || n > MAX_USER_NAME_CHARS {
        return Err("user_name must be 1-30 characters");
    }
    if v.chars().any(|c| c.is_control() || c == '@') {
        return Err("user_name must not contain '@' or control characters");
    }
    if v.chars().all(|c| c.is_ascii_digit() || c == '+') {
        return Err("user_name must not be only digits and '+'");
    }
    Ok(())
}

/// The uniqueness key of a user_name.
pub fn user_name_key(v: &str) -> String {
    v.to_lowercase()
}

/// A phone number with spaces and dashes removed, if it is `+`? then 5-20 digits.
pub fn phone(v: &str) -> Result<String, &'static str> {
    let p: String = v.chars().filter(|&c| c != ' ' && c != '-').collect();
    let digits = p.strip_prefix('+').unwrap_or(&p);
    if PHONE_DIGITS.contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()) {
        Ok(p)
    } else {
        Err("phone must be an optional '+' followed by 5-20 digits")
    }
}

/// An email lowercased, if it has one `@`, a dot inside the domain and no blanks.
pub fn email(v: &str) -> Result<String, &'static str> {
    const MSG: &str = "email must be at most 100 characters, with one '@' and a dot in the domain";
    if v.chars().count() > MAX_EMAIL_CHARS || v.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(MSG);
    }
    let mut parts = v.split('@');
    let (Some(local), Some(domain), None) = (parts.next(), parts.next(), parts.next()) else {
        return Err(MSG);
    };
    let dot_inside = domain
        .find('.')
        .is_some_and(|i| i > 0 && !domain.ends_with('.'));
    if local.is_empty() || !dot_inside {
        return Err(MSG);
    }
    Ok(v.to_lowercase())
}

pub fn pwd(v: &str) -> Result<(), &'static str> {
    if PWD_CHARS.contains(&v.chars().count()) {
        Ok(())
    } else {
        Err("pwd must be 6-128 characters")
    }
}

pub fn user_type(v: Option<&str>) -> Result<u8, &'static str> {
    match v {
        Some("1") => Ok(1),
        Some("2") => Ok(2),
        _ => Err("user_type must be 1 (student) or 2 (teacher)"),
    }
}

/// A bounded free-text profile field.
pub fn text(v: &str, max_chars: usize, msg: &'static str) -> Result<String, &'static str> {
    if v.chars().count() > max_chars || v.chars().any(|c| c.is_control() && c != '\n') {
        Err(msg)
    } else {
        Ok(v.to_string())
    }
}

/// An avatar or audio URL: empty (clears it) or http(s), at most 255 characters.
pub fn url(v: &str, msg: &'static str) -> Result<String, &'static str> {
    if v.is_empty() {
        return Ok(String::new());
    }
    let scheme_ok = v.starts_with("https://") || v.starts_with("http://");
    if !scheme_ok
        || v.len() > MAX_URL_CHARS
        || v.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(msg);
    }
    Ok(v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_names() {
        assert!(user_name("lankc").is_ok());
        assert!(user_name("teacher_1").is_ok());
        assert!(user_name("").is_err());
        assert!(user_name(&"a".repeat(31)).is_err());
        assert!(user_name(&"\u{5b66}".repeat(30)).is_ok());
        assert!(user_name("a@b").is_err());
        assert!(user_name("a\tb").is_err());
        assert!(user_name("+123").is_err());
        assert!(user_name("123").is_err());
        assert_eq!(user_name_key("LanKC"), "lankc");
    }

    #[test]
    fn phones() {
        assert_eq!(phone("+1 555-0100").unwrap(), "+15550100");
        assert_eq!(phone("12345").unwrap(), "12345");
        assert!(phone("1234").is_err());
        assert!(phone(&"1".repeat(21)).is_err());
        assert!(phone("++12345").is_err());
        assert!(phone("12a45").is_err());
    }

    #[test]
    fn emails() {
        assert_eq!(email("A@Example.COM").unwrap(), "a@example.com");
        assert!(email("a@b").is_err());
        assert!(email("a@@b.c").is_err());
        assert!(email("@b.c").is_err());
        assert!(email("a@.c").is_err());
        assert!(email("a@b.").is_err());
        assert!(email("a b@c.d").is_err());
        assert!(email(&format!("{}@b.co", "a".repeat(96))).is_err());
    }

    #[test]
    fn others() {
        assert!(pwd("12345").is_err());
        assert!(pwd("123456").is_ok());
        assert!(pwd(&"x".repeat(129)).is_err());
        assert_eq!(user_type(Some("2")), Ok(2));
        assert!(user_type(Some("3")).is_err());
        assert!(user_type(None).is_err());
        assert!(url("ftp://x", "bad").is_err());
        assert_eq!(url("", "bad").unwrap(), "");
        assert!(url("https://cdn.example/a.png", "bad").is_ok());
    }
}

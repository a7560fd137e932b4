//! Query-string and `application/x-www-form-urlencoded` decoding that rejects what it cannot
//! decode exactly (bad `%` escapes, invalid UTF-8) instead of guessing.

use std::borrow::Cow;

use percent_encoding::percent_decode;

/// Why parameters could not be decoded; answered with 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FormError {
    /// A `%` not followed by two hex digits.
    BadEscape,
    /// The decoded bytes are not UTF-8.
    InvalidUtf8,
}

impl FormError {
    pub fn msg(self) -> &'static str {
        match self {
            FormError::BadEscape => "bad percent-encoding in parameters",
            FormError::InvalidUtf8 => "parameters are not valid UTF-8",
        }
    }
}

/// Decoded parameters of one request: body pairs first, then query pairs, so a lookup finds the
/// body's value when both have the key ("body wins over query"). Within one source the first
/// occurrence of a key wins.
#[derive(Debug, Default)]
pub struct Params<'a> {
    pairs: Vec<(Cow<'a, str>, Cow<'a, str>)>,
}

impl<'a> Params<'a> {
    /// Decodes the body (when form-encoded) and the query string.
    pub fn decode(query: &'a [u8], body: Option<&'a [u8]>) -> Result<Params<'a>, FormError> {
        let mut pairs = Vec::new();
        if let Some(body) = body {
            decode_into(body, &mut pairs)?;
        }
        decode_into(query, &mut pairs)?;
        Ok(Params { pairs })
    }

    /// The value of `key`, if present (possibly empty).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_ref())
    }

    /// The value of `key` if present and not empty.
    pub fn non_empty(&self, key: &str) -> Option<&str> {
        self.get(key).filter(|v| !v.is_empty())
    }
}

fn decode_into<'a>(
    raw: &'a [u8],
    out: &mut Vec<(Cow<'a, str>, Cow<'a, str>)>,
) -> Result<(), FormError> {
    for piece in raw.split(|&b| b == b'&') {
        if piece.is_empty() {
            continue;
        }
        let (k, v) = match memchr::memchr(b'=', piece) {
            Some(i) => (&piece[..i], &piece[i + 1..]),
            None => (piece, &b""[..]),
        };
        out.push((decode_component(k)?, decode_component(v)?));
    }
    Ok(())
}

fn decode_component(raw: &[u8]) -> Result<Cow<'_, str>, FormError> {
    let has_escape = memchr::memchr(b'%', raw).is_some();
    let has_plus = memchr::memchr(b'+', raw).is_some();
    if !has_escape && !has_plus {
        return std::str::from_utf8(raw)
            .map(Cow::Borrowed)
            .map_err(|_| FormError::InvalidUtf8);
    }
    if has_escape {
        check_escapes(raw)?;
    }
    let plus_free: Cow<'_, [u8]> = if has_plus {
        Cow::Owned(
            raw.iter()
                .map(|&b| if b == b'+' { b' ' } else { b })
                .collect(),
        )
    } else {
        Cow::Borrowed(raw)
    };
    let decoded: Cow<'_, [u8]> = percent_decode(&plus_free).into();
    match String::from_utf8(decoded.into_owned()) {
        Ok(s) => Ok(Cow::Owned(s)),
        Err(_) => Err(FormError::InvalidUtf8),
    }
}

/// `percent_decode` passes malformed escapes through unchanged; the API's contract is to refuse
/// them, so they are checked first.
fn check_escapes(raw: &[u8]) -> Result<(), FormError> {
    let mut i = 0;
    while let Some(off) = memchr::memchr(b'%', &raw[i..]) {
        let at = i + off;
        let ok = raw.len() > at + 2
            && raw[at + 1].is_ascii_hexdigit()
            && raw[at + 2].is_ascii_hexdigit();
        if !ok {
            return Err(FormError::BadEscape);
        }
        i = at + 3;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    macro_rules! decodes {
        ($($name:ident: $input:expr => $key:expr, $want:expr;)*) => {$(
            #[test]
            fn $name() {
                let p = Params::decode($input, None).unwrap();
                assert_eq!(p.get($key), $want);
            }
        )*};
    }

    decodes! {
        plain: b"user_name=lankc" => "user_name", Some("lankc");
        plus_is_space: b"a=b+c" => "a", Some("b c");
        percent: b"email=a%40b.co" => "email", Some("a@b.co");
        utf8: b"n=%E5%AD%A6" => "n", Some("\u{5b66}");
        no_value: b"flag" => "flag", Some("");
        first_wins: b"a=1&a=2" => "a", Some("1");
        empty_pieces: b"&&a=1&" => "a", Some("1");
        missing: b"a=1" => "b", None;
        encoded_key: b"user%5Fname=x" => "user_name", Some("x");
    }

    #[test]
    fn body_wins_over_query() {
        let p = Params::decode(b"a=query&b=q", Some(b"a=body")).unwrap();
        assert_eq!(p.get("a"), Some("body"));
        assert_eq!(p.get("b"), Some("q"));
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(
            Params::decode(b"a=%zz", None).unwrap_err(),
            FormError::BadEscape
        );
        assert_eq!(
            Params::decode(b"a=%4", None).unwrap_err(),
            FormError::BadEscape
        );
        assert_eq!(
            Params::decode(b"a=%", None).unwrap_err(),
            FormError::BadEscape
        );
        assert_eq!(
            Params::decode(b"a=%ff", None).unwrap_err(),
            FormError::InvalidUtf8
        );
        assert_eq!(
            Params::decode(b"a=\xff", None).unwrap_err(),
            FormError::InvalidUtf8
        );
    }
}

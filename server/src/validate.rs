//! Field checks shared by every service. Each returns the violation for the
//! named field, so handlers can report every bad field at once.

use crate::error::FieldViolation;

fn violation(field: &str, description: impl Into<String>) -> FieldViolation {
    FieldViolation {
        field: field.to_owned(),
        description: description.into(),
    }
}

/// A slug: 3 to 63 characters of `[a-z0-9-]`, starting with a letter, not
/// ending with a hyphen.
pub fn slug(field: &str, value: &str) -> Result<(), FieldViolation> {
    if value.is_empty() {
        return Err(violation(field, "is required"));
    }
    let valid = (3..=63).contains(&value.len())
        && value.starts_with(|c: char| c.is_ascii_lowercase())
        && !value.ends_with('-')
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if valid {
        Ok(())
    } else {
        Err(violation(
            field,
            "must be 3 to 63 characters of a-z, 0-9 and '-', starting with a letter",
        ))
    }
}

/// A vault object's name (providers, signing keys), used in policy actions:
/// 1 to 64 characters of `[a-z0-9-]`, starting with a letter.
pub fn name(field: &str, value: &str) -> Result<(), FieldViolation> {
    let valid = (1..=64).contains(&value.len())
        && value.starts_with(|c: char| c.is_ascii_lowercase())
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if valid {
        Ok(())
    } else {
        Err(violation(
            field,
            "is required: 1 to 64 characters of a-z, 0-9 and '-', starting with a letter",
        ))
    }
}

/// An absolute URL of at most 2048 characters with a host and no user
/// information: `https`, or also `http` when `allow_http` (development).
/// Returns the parsed URL.
pub fn url(
    field: &str,
    value: &str,
    allow_http: bool,
    allow_fragment: bool,
) -> Result<reqwest::Url, FieldViolation> {
    if value.is_empty() {
        return Err(violation(field, "is required"));
    }
    if value.len() > 2048 {
        return Err(violation(field, "must be at most 2048 characters"));
    }
    let parsed =
        reqwest::Url::parse(value).map_err(|_| violation(field, "must be an absolute URL"))?;
    let scheme_ok = parsed.scheme() == "https" || (allow_http && parsed.scheme() == "http");
    if !scheme_ok {
        return Err(violation(
            field,
            if allow_http {
                "must be an https:// or http:// URL"
            } else {
                "must be an https:// URL"
            },
        ));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(violation(field, "must name a host"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(violation(field, "must not carry credentials"));
    }
    if !allow_fragment && parsed.fragment().is_some() {
        return Err(violation(field, "must not have a fragment"));
    }
    Ok(parsed)
}

/// A required free-text field of at most `max` characters, without control
/// characters.
pub fn required_text(field: &str, value: &str, max: usize) -> Result<(), FieldViolation> {
    if value.trim().is_empty() {
        return Err(violation(field, "is required"));
    }
    optional_text(field, value, max)
}

/// An optional free-text field of at most `max` characters, without control
/// characters.
pub fn optional_text(field: &str, value: &str, max: usize) -> Result<(), FieldViolation> {
    if value.chars().count() > max {
        return Err(violation(
            field,
            format!("must be at most {max} characters"),
        ));
    }
    if value
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return Err(violation(field, "must not contain control characters"));
    }
    Ok(())
}

/// A proto3 enum field: known, and not `*_UNSPECIFIED` unless allowed.
pub fn enum_value<E: TryFrom<i32>>(
    field: &str,
    raw: i32,
    allow_unspecified: bool,
) -> Result<Option<E>, FieldViolation> {
    if raw == 0 {
        return if allow_unspecified {
            Ok(None)
        } else {
            Err(violation(field, "is required"))
        };
    }
    E::try_from(raw)
        .map(Some)
        .map_err(|_| violation(field, format!("unknown enum value {raw}")))
}

/// Page size: 0 means the default of 50, at most 500.
pub fn page_size(field: &str, requested: u32) -> Result<u64, FieldViolation> {
    match requested {
        0 => Ok(50),
        1..=500 => Ok(u64::from(requested)),
        _ => Err(violation(field, "must be at most 500")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs() {
        assert!(slug("slug", "acme-corp").is_ok());
        for bad in ["", "ab", "Acme", "1acme", "acme-", "ac me", &"a".repeat(64)] {
            assert!(slug("slug", bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn texts() {
        assert!(required_text("name", " ", 10).is_err());
        assert!(required_text("name", "hello", 3).is_err());
        assert!(optional_text("name", "bell\u{7}", 10).is_err());
        assert!(optional_text("name", "", 10).is_ok());
    }

    #[test]
    fn names() {
        assert!(name("name", "a").is_ok());
        assert!(name("name", "github-2").is_ok());
        for bad in ["", "2fa", "Git", "git hub", &"a".repeat(65)] {
            assert!(name("name", bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn urls() {
        assert!(url("u", "https://idp.example/authorize", false, false).is_ok());
        assert!(url("u", "http://127.0.0.1:9/token", true, false).is_ok());
        for bad in [
            "",
            "idp.example/token",
            "http://idp.example/token",
            "ftp://idp.example/token",
            "https://user:pw@idp.example/token",
            "https://idp.example/authorize#frag",
        ] {
            assert!(
                url("u", bad, false, false).is_err(),
                "{bad} should be refused"
            );
        }
    }
}

/// Property tests of the shared field checks.
#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;
    use crate::props::{PURE_CASES, config};

    fn url_like() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "(https?|ftp|file|data|javascript)?:?(//|/|\\\\\\\\)?([a-z:@.\\[\\]0-9%-]{0,20})(/[a-z?#=&%.]{0,10})?"
                .prop_map(String::from),
        ]
    }

    proptest! {
        #![proptest_config(config(PURE_CASES))]

        #[test]
        fn slugs_are_exactly_the_documented_form(value in prop_oneof![
            "[a-z0-9-]{0,66}".prop_map(String::from),
            "[a-zA-Z0-9 _-]{0,10}".prop_map(String::from),
            any::<String>(),
        ]) {
            let expected = (3..=63).contains(&value.len())
                && value.starts_with(|c: char| c.is_ascii_lowercase())
                && !value.ends_with('-')
                && value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            prop_assert_eq!(slug("slug", &value).is_ok(), expected);
        }

        #[test]
        fn names_are_exactly_the_documented_form(value in prop_oneof![
            "[a-z0-9-]{0,66}".prop_map(String::from),
            any::<String>(),
        ]) {
            let expected = (1..=64).contains(&value.len())
                && value.starts_with(|c: char| c.is_ascii_lowercase())
                && value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            prop_assert_eq!(name("name", &value).is_ok(), expected);
        }

        #[test]
        fn accepted_urls_are_https_with_a_host_and_no_credentials(
            value in url_like(),
            allow_http in any::<bool>(),
            allow_fragment in any::<bool>(),
        ) {
            if let Ok(parsed) = url("u", &value, allow_http, allow_fragment) {
                prop_assert!(parsed.scheme() == "https" || (allow_http && parsed.scheme() == "http"));
                prop_assert!(parsed.host_str().is_some_and(|h| !h.is_empty()));
                prop_assert!(parsed.username().is_empty() && parsed.password().is_none());
                prop_assert!(allow_fragment || parsed.fragment().is_none());
                prop_assert!(value.len() <= 2048);
            }
        }

        #[test]
        fn texts_count_characters_and_refuse_controls(value in any::<String>(), max in 0usize..40) {
            let ok = optional_text("t", &value, max).is_ok();
            let expected = value.chars().count() <= max
                && !value.chars().any(|c| c.is_control() && c != '\n' && c != '\t');
            prop_assert_eq!(ok, expected);
            if required_text("t", &value, max).is_ok() {
                prop_assert!(ok && !value.trim().is_empty());
            }
        }

        #[test]
        fn enum_values_never_panic(raw in any::<i32>(), allow in any::<bool>()) {
            let checked = enum_value::<vaultguard_proto::v1::Role>("role", raw, allow);
            match checked {
                Ok(Some(role)) => prop_assert_eq!(role as i32, raw),
                Ok(None) => prop_assert!(raw == 0 && allow),
                Err(_) => prop_assert!(raw != 0 || !allow),
            }
        }

        #[test]
        fn page_sizes(requested in any::<u32>()) {
            match page_size("page_size", requested) {
                Ok(size) => prop_assert!((1..=500).contains(&size)),
                Err(_) => prop_assert!(requested > 500),
            }
        }
    }
}

//! How people name their account: an email address or a phone number,
//! normalised so the same person always arrives at the same key (for
//! lookups, uniqueness and login throttling alike).

use crate::AuthError;

/// What someone signs in with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identifier {
    /// A lowercased email address.
    Email(String),
    /// An E.164 phone number (`+442079460958`).
    Phone(String),
}

impl Identifier {
    /// Exactly one of `email` and `phone`, normalised. Errors name the field.
    pub fn one_of(email: &str, phone: &str) -> Result<Self, AuthError> {
        match (email.trim().is_empty(), phone.trim().is_empty()) {
            (false, true) => Ok(Identifier::Email(email_of(email)?)),
            (true, false) => Ok(Identifier::Phone(phone_of(phone)?)),
            (true, true) => Err(AuthError::field("email", "an email or a phone number is required")),
            (false, false) => Err(AuthError::field("phone", "send an email or a phone number, not both")),
        }
    }

    /// The normalised value: a throttling and lookup key (emails hold `@`,
    /// phone numbers start with `+`, so the two never collide).
    pub fn key(&self) -> &str {
        match self {
            Identifier::Email(e) | Identifier::Phone(e) => e,
        }
    }

    /// The email, or "".
    pub fn email(&self) -> &str {
        match self {
            Identifier::Email(e) => e,
            Identifier::Phone(_) => "",
        }
    }

    /// The phone number, or "".
    pub fn phone(&self) -> &str {
        match self {
            Identifier::Phone(p) => p,
            Identifier::Email(_) => "",
        }
    }
}

/// A lowercased, plausible email address.
pub fn email_of(raw: &str) -> Result<String, AuthError> {
    let email = raw.trim().to_lowercase();
    let valid = email.len() <= 254
        && !email.chars().any(char::is_whitespace)
        && email
            .split_once('@')
            .is_some_and(|(local, domain)| !local.is_empty() && domain.contains('.') && !domain.contains('@'));
    if valid {
        Ok(email)
    } else {
        Err(AuthError::field(
            "email",
            "must be an email address like name@example.com",
        ))
    }
}

/// An international phone number as E.164: `+`, a country code not starting
/// with 0, 8 to 15 digits in all. Spaces, dashes, dots and parentheses are
/// dropped; anything else is refused rather than guessed at.
pub fn phone_of(raw: &str) -> Result<String, AuthError> {
    let compact: String = raw
        .chars()
        .filter(|c| !matches!(c, ' ' | '-' | '.' | '(' | ')'))
        .collect();
    let digits = compact.strip_prefix('+').unwrap_or("");
    let valid =
        (8..=15).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()) && !digits.starts_with('0');
    if valid {
        Ok(compact)
    } else {
        Err(AuthError::field(
            "phone",
            "must be an international number like +44 20 7946 0958",
        ))
    }
}

/// A tenant id: "" for none, else a lowercase letter or digit, then
/// letters, digits or `-`, at most 63 characters (DNS-label-like, so it fits
/// in scopes like `tenant/<id>` and in hostnames).
pub fn tenant_of(raw: &str, field: &str) -> Result<String, AuthError> {
    let tenant = raw.trim();
    let valid = tenant.is_empty()
        || (tenant.len() <= 63
            && tenant.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && tenant
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
    if valid {
        Ok(tenant.to_owned())
    } else {
        Err(AuthError::field(
            field,
            "must be lowercase letters, digits and `-`, starting with a letter or digit, at most 63 characters",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phone_numbers_normalise_to_e164() {
        assert_eq!(phone_of("+44 20 7946 0958").unwrap(), "+442079460958");
        assert_eq!(phone_of("+1 (415) 555-0100").unwrap(), "+14155550100");
        assert!(phone_of("020 7946 0958").is_err(), "no country code");
        assert!(phone_of("+0 20 7946 0958").is_err());
        assert!(phone_of("+44 20 7946 0958 ext 2").is_err());
        assert!(phone_of("+1234567").is_err(), "too short");
        assert!(phone_of("+1234567890123456").is_err(), "too long");
    }

    #[test]
    fn tenants_are_dns_label_like() {
        assert_eq!(tenant_of(" acme-2 ", "tenant").unwrap(), "acme-2");
        assert_eq!(tenant_of("", "tenant").unwrap(), "");
        assert!(tenant_of("Acme", "tenant").is_err());
        assert!(tenant_of("-acme", "tenant").is_err());
        assert!(tenant_of("acme/x", "tenant").is_err());
    }

    #[test]
    fn exactly_one_identifier_names_the_field() {
        assert_eq!(
            Identifier::one_of(" Ada@Example.com ", "").unwrap(),
            Identifier::Email("ada@example.com".into())
        );
        assert_eq!(
            Identifier::one_of("", "+44 20 7946 0958").unwrap().key(),
            "+442079460958"
        );
        assert!(Identifier::one_of("", "").is_err());
        assert!(Identifier::one_of("a@example.com", "+442079460958").is_err());
    }
}

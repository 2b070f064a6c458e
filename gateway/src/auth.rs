//! Auth before upgrade: a JWT from the `Authorization: Bearer` header or the
//! `access_token` query parameter, and an Origin allow-list.
//!
//! A rejected client gets an HTTP 401 (token) or 403 (origin) and never
//! reaches a service. Verified claims travel to the service in the client's
//! open frame as a JSON object.

use std::path::PathBuf;

use bytes::Bytes;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

/// JWT algorithms EdgeGate verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtAlgorithm {
    Hs256,
    Rs256,
    Es256,
    EdDsa,
}

#[derive(Debug, Clone)]
pub enum AuthMode {
    /// Every client is accepted with empty claims (demo and tests).
    None,
    Jwt {
        algorithm: JwtAlgorithm,
        key_path: PathBuf,
        /// The key file's bytes, read at check time so a reload sees the new key.
        key: Vec<u8>,
        audience: String,
        issuer: Option<String>,
        leeway_secs: u64,
    },
}

#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub mode: AuthMode,
    /// Empty allows any Origin, including none.
    pub allowed_origins: Vec<String>,
}

/// Why a client was not let in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no token in Authorization header or access_token parameter")]
    MissingToken,
    #[error("invalid token: {0}")]
    InvalidToken(String),
    #[error("origin {0:?} is not allowed")]
    OriginNotAllowed(String),
}

impl AuthError {
    /// The HTTP status the client receives.
    pub fn status(&self) -> u16 {
        match self {
            AuthError::MissingToken | AuthError::InvalidToken(_) => 401,
            AuthError::OriginNotAllowed(_) => 403,
        }
    }
}

/// A problem with the configured key, found at start-up or reload.
#[derive(Debug, thiserror::Error)]
#[error("jwt key: {0}")]
pub struct KeyError(String);

/// Checks tokens and origins; built once per config and shared by all clients.
pub struct Authenticator {
    jwt: Option<(DecodingKey, Validation)>,
    allowed_origins: Vec<String>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("jwt", &self.jwt.is_some())
            .field("allowed_origins", &self.allowed_origins)
            .finish()
    }
}

impl Authenticator {
    /// # Errors
    /// [`KeyError`] when the configured key does not parse for its algorithm.
    pub fn new(config: &AuthConfig) -> Result<Self, KeyError> {
        let jwt = match &config.mode {
            AuthMode::None => None,
            AuthMode::Jwt {
                algorithm,
                key,
                audience,
                issuer,
                leeway_secs,
                ..
            } => {
                let (alg, decoding) = match algorithm {
                    JwtAlgorithm::Hs256 => {
                        // A trailing newline from `echo secret > file` is not part of the secret.
                        let secret = key.strip_suffix(b"\n").unwrap_or(key);
                        if secret.len() < 32 {
                            return Err(KeyError("HS256 secret must be at least 32 bytes".into()));
                        }
                        (Algorithm::HS256, DecodingKey::from_secret(secret))
                    }
                    JwtAlgorithm::Rs256 => (
                        Algorithm::RS256,
                        DecodingKey::from_rsa_pem(key).map_err(|e| KeyError(e.to_string()))?,
                    ),
                    JwtAlgorithm::Es256 => (
                        Algorithm::ES256,
                        DecodingKey::from_ec_pem(key).map_err(|e| KeyError(e.to_string()))?,
                    ),
                    JwtAlgorithm::EdDsa => (
                        Algorithm::EdDSA,
                        DecodingKey::from_ed_pem(key).map_err(|e| KeyError(e.to_string()))?,
                    ),
                };
                let mut validation = Validation::new(alg);
                validation.set_audience(&[audience]);
                if let Some(iss) = issuer {
                    validation.set_issuer(&[iss]);
                }
                validation.leeway = *leeway_secs;
                validation.validate_nbf = true;
                validation.set_required_spec_claims(&["exp", "aud", "sub"]);
                Some((decoding, validation))
            }
        };
        Ok(Self {
            jwt,
            allowed_origins: config.allowed_origins.clone(),
        })
    }

    /// Checks the Origin header (if an allow-list is configured).
    ///
    /// # Errors
    /// [`AuthError::OriginNotAllowed`].
    pub fn check_origin(&self, origin: Option<&str>) -> Result<(), AuthError> {
        if self.allowed_origins.is_empty() {
            return Ok(());
        }
        match origin {
            Some(o) if self.allowed_origins.iter().any(|a| a == o) => Ok(()),
            other => Err(AuthError::OriginNotAllowed(other.unwrap_or("").to_owned())),
        }
    }

    /// Verifies the client's token and returns its claims as JSON bytes for
    /// the service (`{}` when auth is off).
    ///
    /// # Errors
    /// [`AuthError::MissingToken`] or [`AuthError::InvalidToken`].
    pub fn verify(
        &self,
        authorization: Option<&str>,
        query: Option<&str>,
    ) -> Result<Bytes, AuthError> {
        let Some((key, validation)) = &self.jwt else {
            return Ok(Bytes::from_static(b"{}"));
        };
        let token = token_from(authorization, query).ok_or(AuthError::MissingToken)?;
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token, key, validation,
        )
        .map_err(|e| AuthError::InvalidToken(e.to_string()))?;
        let json =
            serde_json::to_vec(&data.claims).map_err(|e| AuthError::InvalidToken(e.to_string()))?;
        Ok(Bytes::from(json))
    }
}

/// The bearer token from the header, else the `access_token` query parameter.
fn token_from<'a>(authorization: Option<&'a str>, query: Option<&'a str>) -> Option<&'a str> {
    if let Some(h) = authorization {
        let (scheme, token) = h.trim().split_once(' ')?;
        if scheme.eq_ignore_ascii_case("bearer") {
            return Some(token.trim());
        }
        return None;
    }
    // JWTs are base64url with dots: no percent-encoding is needed or accepted.
    query?
        .split('&')
        .find_map(|kv| kv.strip_prefix("access_token="))
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use std::path::PathBuf;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn hs256() -> Authenticator {
        Authenticator::new(&AuthConfig {
            mode: AuthMode::Jwt {
                algorithm: JwtAlgorithm::Hs256,
                key_path: PathBuf::from("k"),
                key: SECRET.to_vec(),
                audience: "edgegate".into(),
                issuer: None,
                leeway_secs: 0,
            },
            allowed_origins: vec!["https://ok.example".into()],
        })
        .unwrap()
    }

    fn token(exp_offset: i64, aud: &str) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let claims = serde_json::json!({"sub": "alice", "aud": aud, "exp": now + exp_offset});
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap()
    }

    #[test]
    fn valid_bearer_token_yields_its_claims() {
        let t = token(60, "edgegate");
        let claims = hs256().verify(Some(&format!("Bearer {t}")), None).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&claims).unwrap();
        assert_eq!(v["sub"], "alice");
    }

    #[test]
    fn token_in_query_parameter_is_accepted() {
        let t = token(60, "edgegate");
        assert!(hs256()
            .verify(None, Some(&format!("x=1&access_token={t}")))
            .is_ok());
    }

    #[test]
    fn expired_token_and_wrong_audience_are_rejected() {
        let a = hs256();
        let expired = token(-600, "edgegate");
        assert!(matches!(
            a.verify(Some(&format!("Bearer {expired}")), None),
            Err(AuthError::InvalidToken(_))
        ));
        let wrong = token(60, "other");
        assert!(matches!(
            a.verify(Some(&format!("Bearer {wrong}")), None),
            Err(AuthError::InvalidToken(_))
        ));
        assert_eq!(a.verify(None, None), Err(AuthError::MissingToken));
    }

    #[test]
    fn es256_token_is_verified_with_the_public_key_only() {
        let signer = rcgen::KeyPair::generate().unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        let auth = Authenticator::new(&AuthConfig {
            mode: AuthMode::Jwt {
                algorithm: JwtAlgorithm::Es256,
                key_path: PathBuf::from("pub.pem"),
                key: signer.public_key_pem().into_bytes(),
                audience: "edgegate".into(),
                issuer: Some("https://auth.example".into()),
                leeway_secs: 0,
            },
            allowed_origins: Vec::new(),
        })
        .unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let claims = serde_json::json!({"sub": "bob", "aud": "edgegate", "iss": "https://auth.example", "exp": now + 60});
        let sign = |key: &rcgen::KeyPair, claims: &serde_json::Value| {
            encode(
                &Header::new(jsonwebtoken::Algorithm::ES256),
                claims,
                &EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap(),
            )
            .unwrap()
        };
        let good = sign(&signer, &claims);
        let v: serde_json::Value =
            serde_json::from_slice(&auth.verify(Some(&format!("Bearer {good}")), None).unwrap())
                .unwrap();
        assert_eq!(v["sub"], "bob");
        let forged = sign(&other, &claims);
        assert!(matches!(
            auth.verify(Some(&format!("Bearer {forged}")), None),
            Err(AuthError::InvalidToken(_))
        ));
        let mut wrong_issuer = claims.clone();
        wrong_issuer["iss"] = "https://evil.example".into();
        let t = sign(&signer, &wrong_issuer);
        assert!(auth.verify(Some(&format!("Bearer {t}")), None).is_err());
        // An HS256 token cannot pass where ES256 is configured (algorithm confusion).
        let hs = encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef"),
        )
        .unwrap();
        assert!(auth.verify(Some(&format!("Bearer {hs}")), None).is_err());
    }

    #[test]
    fn not_yet_valid_token_is_rejected() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let claims =
            serde_json::json!({"sub": "a", "aud": "edgegate", "exp": now + 600, "nbf": now + 300});
        let t = encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        assert!(matches!(
            hs256().verify(Some(&format!("Bearer {t}")), None),
            Err(AuthError::InvalidToken(_))
        ));
    }

    #[test]
    fn origin_outside_the_allow_list_is_forbidden() {
        let a = hs256();
        assert!(a.check_origin(Some("https://ok.example")).is_ok());
        assert_eq!(
            a.check_origin(Some("https://evil.example"))
                .unwrap_err()
                .status(),
            403
        );
        assert!(a.check_origin(None).is_err());
    }
}

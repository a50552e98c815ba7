//! Authorization: `auth.mode = none` (the socket's permissions are the boundary) or
//! `token` (HS256 JWTs with namespace grants and scopes).

use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::{AuthMode, Config};

/// What a request may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    KvRead,
    KvWrite,
    FilesRead,
    FilesWrite,
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 5] = [
        Scope::KvRead,
        Scope::KvWrite,
        Scope::FilesRead,
        Scope::FilesWrite,
        Scope::Admin,
    ];
    /// Granted by `token mint` when no `--scope` is given.
    pub const DEFAULT: [Scope; 4] = [
        Scope::KvRead,
        Scope::KvWrite,
        Scope::FilesRead,
        Scope::FilesWrite,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::KvRead => "kv:read",
            Scope::KvWrite => "kv:write",
            Scope::FilesRead => "files:read",
            Scope::FilesWrite => "files:write",
            Scope::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Claims {
    #[serde(default)]
    pub ns: Vec<String>,
    #[serde(default)]
    pub scope: Vec<String>,
    pub exp: u64,
    pub iat: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// 401: no usable token.
    #[error("{0}")]
    Unauthorized(String),
    /// 403: a valid token that does not grant this.
    #[error("{0}")]
    Forbidden(String),
}

/// Who is asking: everyone (mode none) or the holder of these claims.
#[derive(Clone, Debug)]
pub enum Grant {
    Open,
    Token(Claims),
}

impl Grant {
    pub fn require(&self, scope: Scope) -> Result<(), AuthError> {
        match self {
            Grant::Open => Ok(()),
            Grant::Token(c) if c.scope.iter().any(|s| s == scope.as_str()) => Ok(()),
            Grant::Token(_) => Err(AuthError::Forbidden(format!(
                "the token does not grant the `{}` scope",
                scope.as_str()
            ))),
        }
    }

    pub fn allows_namespace(&self, ns: &str) -> bool {
        match self {
            Grant::Open => true,
            Grant::Token(c) => c.ns.iter().any(|g| match g.strip_suffix('*') {
                Some(prefix) => ns.starts_with(prefix),
                None => g == ns,
            }),
        }
    }

    /// The namespace a request without `?ns=` uses: the token's only namespace if it
    /// grants exactly one (not a prefix; named once or more), else `default`.
    pub fn default_namespace(&self) -> &str {
        match self {
            Grant::Token(c) => match c.ns.split_first() {
                Some((only, rest)) if !only.ends_with('*') && rest.iter().all(|n| n == only) => {
                    only
                }
                _ => "default",
            },
            Grant::Open => "default",
        }
    }

    pub fn namespace(&self, ns: &str) -> Result<(), AuthError> {
        if self.allows_namespace(ns) {
            Ok(())
        } else {
            Err(AuthError::Forbidden(format!(
                "the token does not grant namespace `{ns}`"
            )))
        }
    }
}

pub struct Authenticator {
    mode: AuthMode,
    key: Option<DecodingKey>,
    validation: Validation,
    max_ttl: Duration,
}

impl Authenticator {
    pub fn new(config: &Config) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.validate_exp = true;
        // A token not valid yet is refused (RFC 7519); an audience is not checked
        // (sandkeep names none), so a token that carries one is not refused for it.
        validation.validate_nbf = true;
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp", "iat"]);
        Self {
            mode: config.auth.mode,
            key: (!config.auth.secret.is_empty())
                .then(|| DecodingKey::from_secret(config.auth.secret.as_bytes())),
            validation,
            max_ttl: config.auth.max_ttl.0,
        }
    }

    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// Checks an `Authorization` header value.
    pub fn authenticate(&self, header: Option<&str>) -> Result<Grant, AuthError> {
        if self.mode == AuthMode::None {
            return Ok(Grant::Open);
        }
        let unauthorized = |m: &str| AuthError::Unauthorized(m.to_string());
        let header = header.ok_or_else(|| unauthorized("missing bearer token"))?;
        // The scheme is case-insensitive (RFC 9110 §11.1).
        let token = header
            .split_once(' ')
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .ok_or_else(|| unauthorized("the Authorization header must be `Bearer <token>`"))?
            .1
            .trim();
        let key = self
            .key
            .as_ref()
            .ok_or_else(|| unauthorized("no auth secret is configured"))?;
        let data = jsonwebtoken::decode::<Claims>(token, key, &self.validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::ExpiredSignature => unauthorized("the token has expired"),
                ErrorKind::InvalidSignature => unauthorized("the token's signature is invalid"),
                _ => AuthError::Unauthorized(format!("invalid token: {e}")),
            }
        })?;
        let c = data.claims;
        // `iat` bounds the lifetime only if it cannot be set ahead: a token issued "in
        // ten years" with a short lifetime would otherwise be valid for ten years.
        if c.iat > unix_now() + IAT_SKEW_S {
            return Err(unauthorized("the token's iat is in the future"));
        }
        if c.iat > c.exp {
            return Err(unauthorized("the token's iat is after its exp"));
        }
        // RFC 7519: the token is refused from the second `exp` names on (the library
        // lets that second through).
        if c.exp <= unix_now() {
            return Err(unauthorized("the token has expired"));
        }
        // A grant that names no namespace a request could use is a bad token, not a
        // bad request.
        if let Some(bad) = c.ns.iter().find(|g| match g.strip_suffix('*') {
            Some("") => false,
            Some(prefix) => crate::kv::validate::namespace(prefix).is_err(),
            None => crate::kv::validate::namespace(g).is_err(),
        }) {
            return Err(AuthError::Unauthorized(format!(
                "the token names an invalid namespace `{bad}`"
            )));
        }
        if let Some(bad) = c.scope.iter().find(|s| Scope::parse(s).is_none()) {
            // A typo would otherwise grant less than meant without a word.
            return Err(AuthError::Unauthorized(format!(
                "the token names an unknown scope `{bad}`"
            )));
        }
        if c.exp - c.iat > self.max_ttl.as_secs() {
            return Err(unauthorized(
                "the token's lifetime (exp - iat) exceeds auth.max_ttl",
            ));
        }
        Ok(Grant::Token(c))
    }
}

/// How far a token's `iat` may be ahead of this machine's clock (the issuer's clock
/// may run a little fast).
const IAT_SKEW_S: u64 = 60;

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `items`, each once, in the order given.
fn each_once(items: impl Iterator<Item = String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for item in items {
        if !out.contains(&item) {
            out.push(item);
        }
    }
    out
}

/// Signs a token for `namespaces` with `scopes`, valid for `ttl` (capped at `max_ttl`).
pub fn mint(
    secret: &str,
    namespaces: &[String],
    scopes: &[Scope],
    ttl: Duration,
    max_ttl: Duration,
    sub: Option<String>,
) -> Result<String, jsonwebtoken::errors::Error> {
    let iat = unix_now();
    let claims = Claims {
        ns: each_once(namespaces.iter().cloned()),
        scope: each_once(scopes.iter().map(|s| s.as_str().to_string())),
        iat,
        exp: iat + ttl.min(max_ttl).as_secs().max(1),
        sub,
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token_config() -> Config {
        let mut c = Config::default();
        c.auth.mode = AuthMode::Token;
        c.auth.secret = "0123456789abcdef-secret".into();
        c
    }

    #[test]
    fn grants_and_errors() {
        let c = token_config();
        let a = Authenticator::new(&c);
        let day = Duration::from_secs(86400);
        let t = mint(
            &c.auth.secret,
            &["app".into(), "actor:*".into()],
            &[Scope::KvRead],
            day,
            day,
            None,
        )
        .unwrap();
        let g = a.authenticate(Some(&format!("Bearer {t}"))).unwrap();
        for scheme in ["bearer", "BEARER", "BeArEr"] {
            assert!(a.authenticate(Some(&format!("{scheme} {t}"))).is_ok());
        }
        for bad in [format!("Basic {t}"), format!("Bearer{t}"), t.clone()] {
            assert!(matches!(
                a.authenticate(Some(&bad)),
                Err(AuthError::Unauthorized(m)) if m.contains("must be `Bearer")
            ));
        }
        assert!(g.allows_namespace("app"));
        assert!(g.allows_namespace("actor:u1"));
        assert!(!g.allows_namespace("apple"));
        assert!(g.require(Scope::KvRead).is_ok());
        assert!(matches!(
            g.require(Scope::KvWrite),
            Err(AuthError::Forbidden(_))
        ));
        assert_eq!(g.default_namespace(), "default");

        assert!(matches!(
            a.authenticate(None),
            Err(AuthError::Unauthorized(_))
        ));
        assert!(matches!(
            a.authenticate(Some("Bearer garbage")),
            Err(AuthError::Unauthorized(_))
        ));
        let other = mint(
            "another-secret-of-16+",
            &["app".into()],
            &[Scope::KvRead],
            day,
            day,
            None,
        )
        .unwrap();
        assert!(matches!(
            a.authenticate(Some(&format!("Bearer {other}"))),
            Err(AuthError::Unauthorized(_))
        ));

        let one = mint(
            &c.auth.secret,
            &["only".into()],
            &Scope::DEFAULT,
            day,
            day,
            None,
        )
        .unwrap();
        assert_eq!(
            a.authenticate(Some(&format!("Bearer {one}")))
                .unwrap()
                .default_namespace(),
            "only"
        );
        // Named twice, by `mint` (which keeps each once) or by another minter.
        let twice = mint(
            &c.auth.secret,
            &["only".into(), "only".into()],
            &[Scope::KvRead, Scope::KvRead],
            day,
            day,
            None,
        )
        .unwrap();
        match a.authenticate(Some(&format!("Bearer {twice}"))).unwrap() {
            Grant::Token(claims) => {
                assert_eq!(claims.ns, ["only"]);
                assert_eq!(claims.scope, ["kv:read"]);
            }
            Grant::Open => panic!("a token mode grant"),
        }
        let Grant::Token(claims) = a.authenticate(Some(&format!("Bearer {one}"))).unwrap() else {
            panic!("a token mode grant");
        };
        let twice = Grant::Token(Claims {
            ns: vec!["only".into(), "only".into()],
            ..claims.clone()
        });
        assert_eq!(twice.default_namespace(), "only");
        let two = Grant::Token(Claims {
            ns: vec!["only".into(), "other".into()],
            ..claims
        });
        assert_eq!(two.default_namespace(), "default");
    }

    #[test]
    fn lifetime_is_capped() {
        let mut c = token_config();
        c.auth.max_ttl = crate::config::HumanDuration::secs(3600);
        let a = Authenticator::new(&c);
        // A token minted elsewhere with a longer lifetime is refused.
        let long = mint(
            &c.auth.secret,
            &["a".into()],
            &[Scope::KvRead],
            Duration::from_secs(7200),
            Duration::from_secs(7200),
            None,
        )
        .unwrap();
        assert!(
            matches!(a.authenticate(Some(&format!("Bearer {long}"))), Err(AuthError::Unauthorized(m)) if m.contains("max_ttl"))
        );
        // mint caps at max_ttl.
        let capped = mint(
            &c.auth.secret,
            &["a".into()],
            &[Scope::KvRead],
            Duration::from_secs(7200),
            c.auth.max_ttl.0,
            None,
        )
        .unwrap();
        assert!(a.authenticate(Some(&format!("Bearer {capped}"))).is_ok());
    }

    #[test]
    fn iat_in_the_future_or_after_exp_is_refused() {
        let c = token_config();
        let a = Authenticator::new(&c);
        let signed = |iat: u64, exp: u64| {
            let claims = Claims {
                ns: vec!["a".into()],
                scope: vec!["kv:read".into()],
                iat,
                exp,
                sub: None,
            };
            let key = EncodingKey::from_secret(c.auth.secret.as_bytes());
            let t = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap();
            a.authenticate(Some(&format!("Bearer {t}")))
        };
        let now = unix_now();
        let year = 365 * 86_400;
        // A short lifetime that starts in ten years: usable now for ten years otherwise.
        assert!(
            matches!(signed(now + 10 * year, now + 10 * year + 60), Err(AuthError::Unauthorized(m)) if m.contains("future"))
        );
        assert!(
            matches!(signed(now + 50, now + 10), Err(AuthError::Unauthorized(m)) if m.contains("after its exp"))
        );
        // A little clock skew is tolerated; a plain token is fine.
        assert!(signed(now + 30, now + 600).is_ok());
        assert!(signed(now, now + 600).is_ok());
    }

    #[test]
    fn nbf_unknown_scopes_and_audiences() {
        let c = token_config();
        let a = Authenticator::new(&c);
        let now = unix_now();
        let signed = |claims: serde_json::Value| {
            let key = EncodingKey::from_secret(c.auth.secret.as_bytes());
            let t = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap();
            a.authenticate(Some(&format!("Bearer {t}")))
        };
        let base =
            serde_json::json!({"ns": ["a"], "scope": ["kv:read"], "iat": now, "exp": now + 600});
        assert!(signed(base.clone()).is_ok());
        let mut later = base.clone();
        later["nbf"] = (now + 3600).into();
        assert!(matches!(signed(later), Err(AuthError::Unauthorized(_))));
        let mut typo = base.clone();
        typo["scope"] = serde_json::json!(["kv:read", "kv:admin"]);
        assert!(matches!(signed(typo), Err(AuthError::Unauthorized(m)) if m.contains("kv:admin")));
        let mut aud = base.clone();
        aud["aud"] = "some-platform".into();
        assert!(signed(aud).is_ok());
        // No second of grace at `exp` itself.
        let mut at_exp = base.clone();
        at_exp["iat"] = (now - 10).into();
        at_exp["exp"] = now.into();
        assert!(matches!(signed(at_exp), Err(AuthError::Unauthorized(m)) if m.contains("expired")));
        // Namespace grants must name usable namespaces (or prefixes of them).
        for ns in [vec!["bad ns"], vec!["ok", "x/*"], vec![""]] {
            let mut bad = base.clone();
            bad["ns"] = serde_json::json!(ns);
            assert!(
                matches!(signed(bad), Err(AuthError::Unauthorized(m)) if m.contains("invalid namespace")),
                "{ns:?}"
            );
        }
        for ns in [vec!["*"], vec!["actor:*", "app"]] {
            let mut good = base.clone();
            good["ns"] = serde_json::json!(ns);
            assert!(signed(good).is_ok(), "{ns:?}");
        }
    }

    #[test]
    fn open_mode_allows_everything() {
        let a = Authenticator::new(&Config::default());
        let g = a.authenticate(None).unwrap();
        assert!(g.require(Scope::Admin).is_ok());
        assert!(g.allows_namespace("x"));
    }
}

//! `meshctl token create|list|revoke`: the control plane's tokens
//! (`/api/v1/tokens`, admin only) through [`ControlPlane`]. `create`
//! prints the new token alone on stdout (it is shown this once), so
//! `meshctl token create ... > FILE` makes a token file.

use std::time::Duration;

use meshlet_api::access::{paths, CreateToken, CreatedToken, TokenInfo, TokenList};

use crate::client::ControlPlane;
use crate::error::CommandError;
use crate::output::{age, emit, structured, table, Format};

/// What a token may do (`--role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// Everything, token management included.
    Admin,
    /// Reads, traces, the dashboard.
    Viewer,
    /// One service's sidecars: register, heartbeat and deregister its own
    /// instances, watch, stats, spans.
    Sidecar,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Viewer => "viewer",
            Role::Sidecar => "sidecar",
        }
    }
}

/// The flags of `token create`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateArgs {
    pub role: Role,
    pub service: Option<String>,
    pub namespace: Option<String>,
    pub ttl: Option<Duration>,
    pub name: Option<String>,
}

/// The request `token create` sends: `--service` only (and required) for
/// sidecar tokens, whose namespace defaults to `default`; the name defaults
/// to `sidecar-NS-SERVICE` or `ROLE-` and 8 random hex digits (`random`).
pub fn create_request(args: &CreateArgs, random: u32) -> Result<CreateToken, CommandError> {
    let usage = |m: &str| Err(CommandError::Usage(m.to_owned()));
    let (namespace, service) = match (args.role, &args.service) {
        (Role::Sidecar, None) => return usage("a sidecar token needs --service SERVICE"),
        (Role::Sidecar, Some(service)) => (
            Some(args.namespace.clone().unwrap_or_else(|| "default".into())),
            Some(service.clone()),
        ),
        (_, Some(_)) => return usage("--service is only for --role sidecar"),
        (_, None) if args.namespace.is_some() => {
            return usage("--namespace is only for --role sidecar")
        }
        (_, None) => (None, None),
    };
    let ttl_seconds = match args.ttl {
        None => None,
        Some(ttl) if ttl < Duration::from_secs(1) => {
            return usage("--ttl must be at least 1s (e.g. 30m, 1h, 7d)")
        }
        Some(ttl) => Some(ttl.as_secs()),
    };
    let name = match (&args.name, &namespace, &service) {
        (Some(name), _, _) => name.clone(),
        (None, Some(ns), Some(service)) => format!("sidecar-{ns}-{service}"),
        _ => format!("{}-{random:08x}", args.role.as_str()),
    };
    Ok(CreateToken {
        name,
        role: args.role.as_str().to_owned(),
        namespace,
        service,
        ttl_seconds,
    })
}

/// `meshctl token create`: the token alone and a newline on stdout.
pub async fn create(cp: &ControlPlane, args: &CreateArgs) -> Result<bool, CommandError> {
    let request = create_request(args, fastrand::u32(..))?;
    let created: CreatedToken = cp.post(paths::TOKENS, &request).await?;
    emit(&format!("{}\n", created.token));
    Ok(true)
}

/// `meshctl token list [-o json|yaml]`.
pub async fn list(cp: &ControlPlane, format: Format) -> Result<bool, CommandError> {
    let list: TokenList = cp.get(paths::TOKENS).await?;
    match structured(format, &list) {
        Some(text) => emit(&text),
        None => emit(&token_table(&list.tokens, now_secs())),
    }
    Ok(true)
}

/// `meshctl token revoke NAME`.
pub async fn revoke(cp: &ControlPlane, name: &str) -> Result<bool, CommandError> {
    let info: TokenInfo = cp.delete(&paths::token(name)).await?;
    emit(&format!("token/{} revoked\n", info.name));
    Ok(true)
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// NAME ROLE NAMESPACE SERVICE CREATED EXPIRES, by name; `-` where a
/// field does not apply, ages relative to `now` (Unix seconds).
pub fn token_table(tokens: &[TokenInfo], now: u64) -> String {
    let mut tokens: Vec<&TokenInfo> = tokens.iter().collect();
    tokens.sort_by(|a, b| a.name.cmp(&b.name));
    let rows: Vec<Vec<String>> = tokens
        .iter()
        .map(|t| {
            let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
            let created = format!(
                "{} ago",
                age(Duration::from_secs(now.saturating_sub(t.created_at)))
            );
            let expires = match t.expires_at {
                _ if t.expired => "expired".to_owned(),
                None => "never".to_owned(),
                Some(at) if at <= now => "expired".to_owned(),
                Some(at) => format!("in {}", age(Duration::from_secs(at - now))),
            };
            vec![
                t.name.clone(),
                t.role.clone(),
                dash(&t.namespace),
                dash(&t.service),
                created,
                expires,
            ]
        })
        .collect();
    table(
        &["NAME", "ROLE", "NAMESPACE", "SERVICE", "CREATED", "EXPIRES"],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(role: Role) -> CreateArgs {
        CreateArgs {
            role,
            service: None,
            namespace: None,
            ttl: None,
            name: None,
        }
    }

    #[test]
    fn sidecar_tokens_are_bound_to_a_service_and_named_after_it() {
        let mut a = args(Role::Sidecar);
        a.service = Some("orders".into());
        let req = create_request(&a, 0).unwrap();
        assert_eq!(
            req,
            CreateToken {
                name: "sidecar-default-orders".into(),
                role: "sidecar".into(),
                namespace: Some("default".into()),
                service: Some("orders".into()),
                ttl_seconds: None,
            }
        );
        a.namespace = Some("shop".into());
        a.ttl = Some(humantime::parse_duration("7d").unwrap());
        let req = create_request(&a, 0).unwrap();
        assert_eq!(req.name, "sidecar-shop-orders");
        assert_eq!(req.ttl_seconds, Some(7 * 86_400));
        a.name = Some("mine".into());
        assert_eq!(create_request(&a, 0).unwrap().name, "mine");
    }

    #[test]
    fn other_roles_get_a_random_name_and_no_binding() {
        let mut a = args(Role::Viewer);
        a.ttl = Some(humantime::parse_duration("30m").unwrap());
        let req = create_request(&a, 0xab12).unwrap();
        assert_eq!(req.name, "viewer-0000ab12");
        assert_eq!(req.role, "viewer");
        assert_eq!((req.namespace, req.service), (None, None));
        assert_eq!(req.ttl_seconds, Some(1800));
        assert_eq!(
            create_request(&args(Role::Admin), 1).unwrap().name,
            "admin-00000001"
        );
    }

    #[test]
    fn wrong_combinations_are_usage_errors() {
        let err = |a: &CreateArgs| create_request(a, 0).unwrap_err().to_string();
        assert_eq!(
            err(&args(Role::Sidecar)),
            "a sidecar token needs --service SERVICE"
        );
        let mut a = args(Role::Admin);
        a.service = Some("orders".into());
        assert_eq!(err(&a), "--service is only for --role sidecar");
        let mut a = args(Role::Viewer);
        a.namespace = Some("shop".into());
        assert_eq!(err(&a), "--namespace is only for --role sidecar");
        let mut a = args(Role::Admin);
        a.ttl = Some(Duration::from_millis(500));
        assert!(err(&a).starts_with("--ttl must be at least 1s"));
    }

    #[test]
    fn the_list_is_a_table_by_name() {
        let now = 1_000_000;
        let tokens = vec![
            TokenInfo {
                name: "sidecar-default-orders".into(),
                role: "sidecar".into(),
                namespace: Some("default".into()),
                service: Some("orders".into()),
                created_at: now - 90,
                expires_at: Some(now + 3600),
                expired: false,
            },
            TokenInfo {
                name: "admin".into(),
                role: "admin".into(),
                namespace: None,
                service: None,
                created_at: now - 2 * 86_400,
                expires_at: None,
                expired: false,
            },
            TokenInfo {
                name: "viewer-1".into(),
                role: "viewer".into(),
                namespace: None,
                service: None,
                created_at: now - 7200,
                expires_at: Some(now - 1),
                expired: true,
            },
        ];
        assert_eq!(
            token_table(&tokens, now),
            "NAME                     ROLE      NAMESPACE   SERVICE   CREATED     EXPIRES\n\
             admin                    admin     -           -         2d0h ago    never\n\
             sidecar-default-orders   sidecar   default     orders    1m30s ago   in 1h0m\n\
             viewer-1                 viewer    -           -         2h0m ago    expired\n"
        );
        let json = structured(Format::Json, &TokenList { tokens }).unwrap();
        assert!(json.contains("\"createdAt\": 999910"), "{json}");
    }
}

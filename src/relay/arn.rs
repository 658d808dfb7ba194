//! ECS ARNs and cluster names, parsed into fields (contract v1.2 identity rules).
//!
//! The producer check compares fields, never whole strings: a cluster name may not hold `:` or
//! `/`, so no value can stand in for another ARN's fields. Anything that does not parse is
//! refused where it is read (decode), and the check refuses what it cannot parse again.

/// The partitions ECS runs in (the AWS SDKs' partition list: commercial, China, GovCloud, the
/// ISO partitions and the European Sovereign Cloud).
pub const PARTITIONS: [&str; 8] = [
    "aws",
    "aws-cn",
    "aws-us-gov",
    "aws-iso",
    "aws-iso-b",
    "aws-iso-e",
    "aws-iso-f",
    "aws-eusc",
];

/// ECS's cluster name rule: up to 255 letters, digits, hyphens and underscores.
pub const CLUSTER_NAME_MAX: usize = 255;

/// The resource types an ECS ARN of the wire contract names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resource {
    Task,
    Attachment,
    Cluster,
}

impl Resource {
    pub fn as_str(self) -> &'static str {
        match self {
            Resource::Task => "task",
            Resource::Attachment => "attachment",
            Resource::Cluster => "cluster",
        }
    }
}

/// `arn:<partition>:ecs:<region>:<account>:<type>/<path>`, each field checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arn<'a> {
    pub partition: &'a str,
    pub region: &'a str,
    pub account: &'a str,
    pub resource: Resource,
    /// What follows `<type>/`: a cluster's name; a task's or attachment's `<id>` (old form) or
    /// `<cluster>/<id>` (new form).
    pub path: &'a str,
}

impl<'a> Arn<'a> {
    /// The ARN if `s` is an ECS ARN of `resource`'s type with every field well formed.
    pub fn parse(s: &'a str, resource: Resource) -> Option<Arn<'a>> {
        let mut fields = s.splitn(6, ':');
        if fields.next()? != "arn" {
            return None;
        }
        let partition = fields.next().filter(|p| PARTITIONS.contains(p))?;
        if fields.next()? != "ecs" {
            return None;
        }
        let region = fields.next().filter(|r| is_region(r))?;
        let account = fields
            .next()
            .filter(|a| a.len() == 12 && a.bytes().all(|b| b.is_ascii_digit()))?;
        let path = fields
            .next()?
            .strip_prefix(resource.as_str())?
            .strip_prefix('/')?;
        let well_formed = match resource {
            Resource::Cluster => is_cluster_name(path),
            // `<id>` or `<cluster>/<id>`.
            Resource::Task | Resource::Attachment => match path.split_once('/') {
                Some((cluster, id)) => is_cluster_name(cluster) && is_id(id),
                None => is_id(path),
            },
        };
        well_formed.then_some(Arn {
            partition,
            region,
            account,
            resource,
            path,
        })
    }

    /// The cluster a new-form task or attachment ARN names (`<type>/<cluster>/<id>`).
    pub fn cluster_segment(&self) -> Option<&'a str> {
        match self.resource {
            Resource::Cluster => None,
            _ => self.path.split_once('/').map(|(cluster, _)| cluster),
        }
    }
}

/// A Region code: lowercase letters, digits and hyphens, starting with a letter
/// (`us-east-1`, `us-gov-west-1`, `us-isob-east-1`).
fn is_region(s: &str) -> bool {
    (1..=32).contains(&s.len())
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// A cluster name as ECS allows it.
pub fn is_cluster_name(s: &str) -> bool {
    (1..=CLUSTER_NAME_MAX).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A task or attachment id: the same characters as a cluster name (ECS ids are hex or UUIDs).
fn is_id(s: &str) -> bool {
    is_cluster_name(s)
}

/// The `cluster` field of an event: a cluster name or a full cluster ARN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterRef<'a> {
    Name(&'a str),
    Arn(Arn<'a>),
}

impl<'a> ClusterRef<'a> {
    pub fn parse(s: &'a str) -> Option<ClusterRef<'a>> {
        if s.starts_with("arn:") {
            Arn::parse(s, Resource::Cluster).map(ClusterRef::Arn)
        } else {
            is_cluster_name(s).then_some(ClusterRef::Name(s))
        }
    }

    pub fn name(&self) -> &'a str {
        match self {
            ClusterRef::Name(name) => name,
            ClusterRef::Arn(arn) => arn.path,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_arns_old_and_new_form() {
        let new = Arn::parse(
            "arn:aws:ecs:us-east-1:123456789012:task/prod/0123abcd",
            Resource::Task,
        )
        .unwrap();
        assert_eq!(new.cluster_segment(), Some("prod"));
        let old = Arn::parse(
            "arn:aws-us-gov:ecs:us-gov-west-1:123456789012:task/0123abcd",
            Resource::Task,
        )
        .unwrap();
        assert_eq!((old.partition, old.cluster_segment()), ("aws-us-gov", None));
        for bad in [
            "arn:aws:ecs:us-east-1:123:task/abc",
            "arn:aws:ecs:us-east-1:123456789012:container/abc",
            "arn:aws:ec2:us-east-1:123456789012:task/abc",
            "arn:awsx:ecs:us-east-1:123456789012:task/abc",
            "arn:aws:ecs:US-EAST-1:123456789012:task/abc",
            "arn:aws:ecs:us-east-1:123456789012:task/",
            "arn:aws:ecs:us-east-1:123456789012:task/a/b/c",
            "arn:aws:ecs:us-east-1:123456789012:task/x:1:cluster/p/abc",
            "arn:aws:ecs:us-east-1:123456789012:taskx/abc",
            "task/abc",
            "x",
        ] {
            assert_eq!(Arn::parse(bad, Resource::Task), None, "{bad}");
        }
    }

    #[test]
    fn attachment_arns_are_ecs_attachment_arns() {
        assert!(Arn::parse(
            "arn:aws:ecs:us-east-1:123456789012:attachment/a1b2c3d4-5678",
            Resource::Attachment
        )
        .is_some());
        for bad in [
            "x",
            "arn:aws:ec2:us-east-1:123456789012:eni-attachment/a",
            "arn:aws:ecs:us-east-1:123456789012:task/a",
        ] {
            assert_eq!(Arn::parse(bad, Resource::Attachment), None, "{bad}");
        }
    }

    #[test]
    fn cluster_values_are_names_or_cluster_arns() {
        assert_eq!(
            ClusterRef::parse("prod_1-a").map(|c| c.name()),
            Some("prod_1-a")
        );
        let arn = ClusterRef::parse("arn:aws:ecs:eu-west-1:123456789012:cluster/prod").unwrap();
        assert_eq!(arn.name(), "prod");
        let long = "a".repeat(CLUSTER_NAME_MAX + 1);
        for bad in [
            "",
            "x:123456789012:cluster/prod",
            "a/b",
            "pr*d",
            "prod ",
            "prodé",
            long.as_str(),
            "arn:aws:ecs:eu-west-1:123456789012:cluster/a/b",
            "arn:aws:ecs:eu-west-1:123456789012:task/prod",
        ] {
            assert_eq!(ClusterRef::parse(bad), None, "{bad:?}");
        }
    }
}

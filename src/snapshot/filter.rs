//! containerd's filter language, as far as snapshots use it.
//!
//! A request carries several filter strings that are OR-ed; within one string, selectors are
//! separated by `,` and AND-ed. A selector is a field path (`kind`, `name`, `parent`,
//! `labels.KEY` with KEY optionally quoted) optionally followed by `==`, `!=` or `~=` (regular
//! expression) and a value, quoted or bare. A bare selector asks that the field be present.
//! containerd finds the snapshot a remote snapshotter committed with
//! `labels."containerd.io/snapshot.ref"==<chain id>`, so this must accept exactly that.

use regex::Regex;

use super::types::Info;

/// One parsed filter string: all of its selectors must match.
#[derive(Debug)]
pub struct Filter {
    selectors: Vec<Selector>,
}

#[derive(Debug)]
struct Selector {
    field: Vec<String>,
    op: Op,
}

#[derive(Debug)]
enum Op {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(Regex),
}

/// Why a filter string was refused; `grpc::status` reports it as InvalidArgument.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason} at byte {at}")]
pub struct FilterError {
    pub reason: String,
    pub at: usize,
}

/// Parses every filter string; an empty list matches everything.
pub fn parse_all(filters: &[String]) -> Result<Vec<Filter>, (String, FilterError)> {
    filters
        .iter()
        .filter(|f| !f.trim().is_empty())
        .map(|f| Filter::parse(f).map_err(|e| (f.clone(), e)))
        .collect()
}

/// True when `info` matches any of `filters` (or there are none).
pub fn matches_any(filters: &[Filter], info: &Info) -> bool {
    filters.is_empty() || filters.iter().any(|f| f.matches(info))
}

impl Filter {
    pub fn parse(input: &str) -> Result<Self, FilterError> {
        let mut parser = Parser { input, pos: 0 };
        let mut selectors = Vec::new();
        loop {
            selectors.push(parser.selector()?);
            parser.skip_space();
            match parser.peek() {
                None => break,
                Some(',') => parser.pos += 1,
                Some(c) => return Err(parser.error(format!("unexpected {c:?}"))),
            }
        }
        Ok(Filter { selectors })
    }

    pub fn matches(&self, info: &Info) -> bool {
        self.selectors.iter().all(|s| s.matches(info))
    }
}

impl Selector {
    fn matches(&self, info: &Info) -> bool {
        let value = field_value(info, &self.field);
        match (&self.op, value) {
            (Op::Present, v) => v.is_some(),
            (Op::Equal(want), Some(v)) => v == want.as_str(),
            (Op::NotEqual(want), Some(v)) => v != want.as_str(),
            // containerd treats a missing field as not equal to anything.
            (Op::NotEqual(_), None) => true,
            (Op::Matches(re), Some(v)) => re.is_match(v),
            (_, None) => false,
        }
    }
}

/// The snapshot fields containerd's snapshot adaptor exposes.
fn field_value<'a>(info: &'a Info, field: &[String]) -> Option<&'a str> {
    match field {
        [f] if f == "kind" => Some(info.kind.as_filter_value()),
        [f] if f == "name" => Some(info.name.as_str()),
        [f] if f == "parent" => Some(info.parent.as_str()),
        [f, key] if f == "labels" => info.labels.get(key).map(String::as_str),
        _ => None,
    }
}

struct Parser<'a> {
    input: &'a str,
    pos: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<char> {
        self.input[self.pos..].chars().next()
    }

    fn skip_space(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.pos += 1;
        }
    }

    fn error(&self, reason: impl Into<String>) -> FilterError {
        FilterError {
            reason: reason.into(),
            at: self.pos,
        }
    }

    fn selector(&mut self) -> Result<Selector, FilterError> {
        let mut field = vec![self.field_part()?];
        while self.peek() == Some('.') {
            self.pos += 1;
            field.push(self.field_part()?);
        }
        self.skip_space();
        let rest = &self.input[self.pos..];
        let op = if rest.is_empty() || rest.starts_with(',') {
            return Ok(Selector {
                field,
                op: Op::Present,
            });
        } else if rest.starts_with("==") {
            "=="
        } else if rest.starts_with("!=") {
            "!="
        } else if rest.starts_with("~=") {
            "~="
        } else {
            return Err(self.error("expected an operator (==, != or ~=)"));
        };
        self.pos += 2;
        self.skip_space();
        let value = self.value()?;
        let op = match op {
            "==" => Op::Equal(value),
            "!=" => Op::NotEqual(value),
            _ => Op::Matches(
                Regex::new(&value)
                    .map_err(|e| self.error(format!("bad regular expression: {e}")))?,
            ),
        };
        Ok(Selector { field, op })
    }

    fn field_part(&mut self) -> Result<String, FilterError> {
        self.skip_space();
        if matches!(self.peek(), Some('"') | Some('\'')) {
            return self.quoted();
        }
        let start = self.pos;
        while self
            .peek()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            self.pos += 1;
        }
        if start == self.pos {
            return Err(self.error("expected a field name"));
        }
        Ok(self.input[start..self.pos].to_owned())
    }

    fn value(&mut self) -> Result<String, FilterError> {
        if matches!(self.peek(), Some('"') | Some('\'') | Some('/')) {
            return self.quoted();
        }
        let start = self.pos;
        while self.peek().is_some_and(|c| c != ',') {
            self.pos += 1;
        }
        let value = self.input[start..self.pos].trim_end();
        if value.is_empty() {
            return Err(self.error("expected a value"));
        }
        Ok(value.to_owned())
    }

    /// A string in `"`, `'` or `/` quotes with backslash escapes, as containerd's scanner reads.
    fn quoted(&mut self) -> Result<String, FilterError> {
        let start = self.pos;
        let quote = self.peek().ok_or_else(|| self.error("expected a quote"))?;
        self.pos += quote.len_utf8();
        let mut out = String::new();
        let mut chars = self.input[self.pos..].char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => out.push('\n'),
                    Some((_, 't')) => out.push('\t'),
                    Some((_, e)) => out.push(e),
                    None => break,
                },
                c if c == quote => {
                    self.pos += i + c.len_utf8();
                    return Ok(out);
                }
                c => out.push(c),
            }
        }
        self.pos = start;
        Err(self.error("unterminated quoted string"))
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::snapshot::types::{Kind, Labels};

    fn info(name: &str, parent: &str, kind: Kind, labels: &[(&str, &str)]) -> Info {
        Info {
            name: name.into(),
            parent: parent.into(),
            kind,
            created_at: SystemTime::UNIX_EPOCH,
            updated_at: SystemTime::UNIX_EPOCH,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Labels>(),
        }
    }

    fn matches(filter: &str, info: &Info) -> bool {
        Filter::parse(filter).expect("filter parses").matches(info)
    }

    #[test]
    fn containerd_remote_snapshot_lookup() {
        let target = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        let committed = info(
            "x",
            "",
            Kind::Committed,
            &[("containerd.io/snapshot.ref", target)],
        );
        let filter = format!(r#"labels."containerd.io/snapshot.ref"=={target}"#);
        assert!(matches(&filter, &committed));
        let quoted = format!(r#"labels."containerd.io/snapshot.ref"=="{target}""#);
        assert!(matches(&quoted, &committed));
        assert!(!matches(&filter, &info("y", "", Kind::Committed, &[])));
    }

    #[test]
    fn comma_is_and_and_list_is_or() {
        let active = info("a", "p", Kind::Active, &[]);
        assert!(matches("kind==active,parent==p", &active));
        assert!(!matches("kind==active,parent==q", &active));
        let filters = parse_all(&["kind==view".into(), "name==a".into()]).expect("filters parse");
        assert!(matches_any(&filters, &active));
        assert!(matches_any(&[], &active));
    }

    #[test]
    fn operators_and_presence() {
        let i = info("abc", "", Kind::Committed, &[("k", "v1")]);
        assert!(matches("name~=^a.c$", &i));
        assert!(matches("name!=x", &i));
        assert!(matches("labels.k", &i));
        assert!(!matches("labels.missing", &i));
        assert!(matches("labels.missing!=v", &i));
        assert!(matches("labels.k==v1", &i));
        assert!(matches("kind == committed", &i));
    }

    #[test]
    fn bad_filters_name_the_problem() {
        assert!(Filter::parse("kind=active").is_err());
        assert!(Filter::parse("labels.\"open").is_err());
        assert!(Filter::parse("name~=(").is_err());
        assert!(Filter::parse("==x").is_err());
        let err = Filter::parse("kind==").expect_err("empty value refused");
        assert!(err.reason.contains("value"), "{err}");
    }
}

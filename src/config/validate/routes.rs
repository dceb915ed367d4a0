//! `[[routes]]`: source, match, filter, destinations, reply, order_by.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use toml::Spanned;

use super::defaults;
use super::Cx;
use crate::config::raw::*;
use crate::config::*;
use crate::event_id::IdPath;
use crate::rules::{Filter, Matcher};

use super::sorted;

impl Cx<'_> {
    pub(super) fn route(
        &mut self,
        i: usize,
        r: &Spanned<RawRoute>,
        src_index: &HashMap<String, usize>,
        dest_index: &HashMap<String, usize>,
        destinations: &[Arc<Destination>],
        names: &mut HashSet<String>,
    ) -> Option<Route> {
        let key = format!("routes[{i}]");
        let raw = r.get_ref();
        let name = self.name(&raw.name, &format!("{key}.name"), names, "route");
        // `None`: its problem (an unset variable) is said already.
        let source_name = self.string(&raw.source, &format!("{key}.source"));
        let source = source_name.as_ref().and_then(|n| src_index.get(n).copied());
        if let (None, Some(source_name)) = (source, &source_name) {
            let known: Vec<&str> = src_index.keys().map(String::as_str).collect();
            self.err(
                Some(raw.source.span()),
                &format!("{key}.source"),
                format!("unknown source {source_name:?} (known: {})", sorted(known)),
            );
        }
        let mut matchers = Vec::new();
        let mut shown = Vec::new();
        for (field, v) in raw.match_.iter().flatten() {
            let mk = format!("{key}.match.{field}");
            let raw_field = field;
            let Some(field) = self.expand(field, v.span(), &mk) else {
                continue;
            };
            // A JSONPath here would silently never match: keys are top-level field names.
            if field == "$" || field.starts_with("$.") || field.starts_with("$[") {
                self.err(
                    Some(v.span()),
                    &mk,
                    format!("{field:?} is not a top-level field name: match compares top-level fields (write \"eventType\", not \"$.eventType\"); test a nested field with filter"),
                );
                continue;
            }
            let listed = match v.get_ref() {
                RawMatchValue::One(s) => std::slice::from_ref(s),
                RawMatchValue::Many(list) => list.as_slice(),
            };
            let values: Vec<String> = listed
                .iter()
                .filter_map(|x| self.expand(x, v.span(), &mk))
                .collect();
            if values.is_empty() {
                self.err(
                    Some(v.span()),
                    &mk,
                    "an empty list matches nothing; list values or use \"*\"",
                );
            }
            matchers.push(Matcher::new(field, values));
            shown.push(Matcher::new(raw_field.clone(), listed.to_vec()).to_string());
        }
        if let Some(f) = &raw.filter {
            shown.push(format!("filter {}", f.get_ref()));
        }
        if shown.is_empty() {
            shown.push("every event".to_string());
        }
        let filter = raw.filter.as_ref().and_then(|f| {
            let k = format!("{key}.filter");
            let text = self.string(f, &k)?;
            // A filter may compare with a secret (a provider's verification token).
            self.expanded_a_secret();
            Filter::compile(&text)
                .map_err(|e| {
                    self.err(
                        Some(f.span()),
                        &k,
                        format!("invalid filter expression {text:?}: {e}"),
                    )
                })
                .ok()
        });
        let mut to = Vec::new();
        let mut to_names = Vec::new();
        for (j, d) in raw.to.get_ref().iter().enumerate() {
            let Some(dname) = self.string(d, &format!("{key}.to[{j}]")) else {
                continue;
            };
            to_names.push(dname.clone());
            match dest_index.get(&dname) {
                Some(&di) if !to.contains(&di) => to.push(di),
                Some(_) => {}
                None => {
                    let known: Vec<&str> = dest_index.keys().map(String::as_str).collect();
                    self.err(
                        Some(d.span()),
                        &format!("{key}.to[{j}]"),
                        format!("unknown destination {dname:?} (known: {})", sorted(known)),
                    );
                }
            }
        }
        if raw.to.get_ref().is_empty() {
            self.err(
                Some(raw.to.span()),
                &format!("{key}.to"),
                "name at least one destination",
            );
        }
        let reply = raw.reply.as_ref().and_then(|rp| {
            let rk = format!("{key}.reply");
            let rp = rp.get_ref();
            let from = self.string(&rp.from, &format!("{rk}.from"))?;
            let Some(&di) = dest_index.get(&from) else {
                self.err(
                    Some(rp.from.span()),
                    &format!("{rk}.from"),
                    format!("unknown destination {from:?}"),
                );
                return None;
            };
            if !to_names.contains(&from) {
                self.err(
                    Some(rp.from.span()),
                    &format!("{rk}.from"),
                    format!("{from:?} must also be listed in {key}.to"),
                );
            }
            let timeout = self.duration_nonzero(
                &rp.timeout,
                &format!("{rk}.timeout"),
                destinations[di].timeout,
            );
            let fb = rp.fallback.as_ref().map(|f| f.get_ref());
            let status = match fb.and_then(|f| f.status.as_ref()) {
                None => defaults::FALLBACK_STATUS,
                Some(s) => match u16::try_from(*s.get_ref()) {
                    Ok(c) if (200..=599).contains(&c) => c,
                    _ => {
                        self.err(
                            Some(s.span()),
                            &format!("{rk}.fallback.status"),
                            "must be an HTTP status from 200 to 599",
                        );
                        defaults::FALLBACK_STATUS
                    }
                },
            };
            let body = match fb.and_then(|f| f.body.as_ref()) {
                Some(b) => self
                    .string(b, &format!("{rk}.fallback.body"))
                    .unwrap_or_default(),
                None => defaults::FALLBACK_BODY.into(),
            };
            let content_type = match fb.and_then(|f| f.content_type.as_ref()) {
                Some(c) => {
                    let key = format!("{rk}.fallback.content_type");
                    let text = self.string(c, &key).unwrap_or_default();
                    if http::HeaderValue::from_str(&text).is_err() {
                        let why = format!("{text:?} cannot be sent as a Content-Type header");
                        self.err(Some(c.span()), &key, why);
                    }
                    text
                }
                None => defaults::FALLBACK_CONTENT_TYPE.into(),
            };
            Some(Reply {
                from: di,
                timeout,
                fallback_status: status,
                fallback_body: body,
                fallback_content_type: content_type,
            })
        });
        let mut order_by = Vec::new();
        for (j, p) in raw.order_by.iter().flatten().enumerate() {
            let k = format!("{key}.order_by[{j}]");
            let Some(text) = self.string(p, &k) else {
                continue;
            };
            match IdPath::compile(&text) {
                Ok(ip) => order_by.push(ip),
                Err(e) => self.err(
                    Some(p.span()),
                    &k,
                    format!("invalid JSONPath {text:?}: {e}"),
                ),
            }
        }
        Some(Route {
            name,
            source: source?,
            matchers,
            filter,
            shown_when: shown.join(" "),
            to,
            reply,
            order_by,
        })
    }
}

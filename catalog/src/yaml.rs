//! Messages of the YAML parser (serde-saphyr), worded for the people who wrote the file.
//! Pure.

/// Words a YAML parser message for people: serde-saphyr reports its resource limits as
/// `budget breached: Nodes { nodes: 250001 }`; this says what was too large. Other
/// messages pass through. Pure.
pub fn yaml_message(message: &str) -> String {
    let Some((before, breach)) = message.split_once("budget breached: ") else {
        return message.to_owned();
    };
    let kind = breach.split([' ', '{']).next().unwrap_or_default();
    let n: String = breach
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(char::is_ascii_digit)
        .collect();
    let what = match kind {
        "Nodes" => format!(
            "more than {} nodes once anchors and aliases are expanded",
            n.parse::<u64>()
                .map_or(n.clone(), |v| (v.saturating_sub(1)).to_string())
        ),
        "Events" => format!("more than {n} parser events"),
        "Aliases" => format!("{n} aliases (*name), more than allowed"),
        "Anchors" => format!("{n} anchors (&name), more than allowed"),
        "Depth" => format!("nesting {n} levels deep, more than allowed"),
        "Documents" => format!("{n} documents, more than allowed"),
        "ScalarBytes" => format!("{n} bytes of values, more than allowed"),
        "MergeKeys" => format!("{n} merge keys (<<), more than allowed"),
        "AliasAnchorRatio" => {
            "far more aliases than anchors, the shape of a \"billion laughs\" expansion".into()
        }
        "InputBytes" => format!("{n} bytes, more than allowed"),
        _ => breach.to_owned(),
    };
    format!(
        "{before}the YAML has {what}: meshfed refuses to read it (a limit against memory exhaustion)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_limits_are_worded_for_people() {
        let m = yaml_message("budget breached: Nodes { nodes: 250001 }");
        assert!(
            m.contains("more than 250000 nodes") && m.contains("anchors and aliases"),
            "{m}"
        );
        let m = yaml_message("budget breached: Depth { depth: 2001 }");
        assert!(m.contains("nesting 2001 levels deep"), "{m}");
        assert_eq!(yaml_message("unknown field `x`"), "unknown field `x`");
    }
}

//! Loading the one YAML file: read -> parse (serde, unknown keys rejected) -> validate as a whole
//! (every problem collected, each with file, line, column and field path) -> a compiled
//! [`GatewayConfig`] that holds no strings the request path would have to interpret.
//! Loading never touches the network and never mutates running state; `snapshot` does that.

mod check;
pub mod schema;
mod spans;
mod validate;

use std::fmt;
use std::path::{Path, PathBuf};

pub use validate::{GatewayConfig, ServerSettings, TierSpec};

/// One problem in a config file, printed as `PATH:LINE:COLUMN: field.path: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    /// Dotted field path, e.g. `routes[3].upstream`; empty for file-level problems.
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let field = if self.field.is_empty() {
            "(file)"
        } else {
            &self.field
        };
        write!(
            f,
            "{}:{}:{}: {}: {}",
            self.file.display(),
            self.line,
            self.column,
            field,
            self.message
        )
    }
}

/// Read, parse and validate `path`. Errors: every problem found, in file order.
pub fn load(path: &Path) -> Result<GatewayConfig, Vec<ConfigError>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![ConfigError {
            file: path.to_path_buf(),
            line: 0,
            column: 0,
            field: String::new(),
            message: format!("cannot read file: {e}"),
        }]
    })?;
    load_str(path, &text)
}

/// Parse and validate `text` as if read from `path` (used by tests and fuzzing).
pub fn load_str(path: &Path, text: &str) -> Result<GatewayConfig, Vec<ConfigError>> {
    let file: schema::FileConfig = match serde_yaml_ng::from_str(text) {
        Ok(file) => file,
        Err(e) => return Err(vec![serde_error(path, &e)]),
    };
    let base_dir = path.parent().unwrap_or(Path::new("."));
    validate::compile(file, base_dir).map_err(|problems| {
        let index = spans::SpanIndex::new(text);
        let mut errors: Vec<ConfigError> = problems
            .into_iter()
            .map(|p| {
                let (line, column) = index.locate(&p.field);
                ConfigError {
                    file: path.to_path_buf(),
                    line,
                    column,
                    field: one_line(&p.field),
                    message: one_line(&p.message),
                }
            })
            .collect();
        errors.sort_by_key(|e| (e.line, e.column));
        errors
    })
}

/// Messages from other crates (regex) can span lines; a config error is one line.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// serde_yaml formats errors as `field.path: message at line L column C`; split that back apart.
fn serde_error(path: &Path, e: &serde_yaml_ng::Error) -> ConfigError {
    let (line, column) = e
        .location()
        .map(|l| (l.line(), l.column()))
        .unwrap_or((1, 1));
    let mut text = e.to_string();
    if let Some(i) = text.rfind(" at line ") {
        text.truncate(i);
    }
    // A path prefix is present when the error is inside a field: `routes[0].match: unknown field`.
    let (mut field, message) = match text.split_once(": ") {
        Some((f, m)) if !f.contains(' ') => (f.to_string(), m.to_string()),
        _ => (String::new(), text),
    };
    // Name the offending key itself: `routes[0].match.pathprefix`, not `routes[0].match`.
    if let Some(rest) = message.strip_prefix("unknown field `") {
        if let Some((name, _)) = rest.split_once('`') {
            field = if field.is_empty() {
                name.to_string()
            } else {
                format!("{field}.{name}")
            };
        }
    }
    ConfigError {
        file: path.to_path_buf(),
        line,
        column,
        // A key can hold a line break (`"a\nb": 1`); an error is one line.
        field: one_line(&field),
        message: one_line(&message),
    }
}

#[cfg(test)]
mod tests;

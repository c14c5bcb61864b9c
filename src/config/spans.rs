//! Where each node of a YAML file stands: an index from field paths (`routes[3].upstream`) to
//! line and column, so semantic errors found after deserialisation still point into the file.
//! It reads events only; it never interprets values.

use std::collections::HashMap;

use saphyr_parser::{Event, Parser, Span, SpannedEventReceiver};

/// Field path -> (line, column), both 1-based.
#[derive(Debug, Default)]
pub struct SpanIndex {
    positions: HashMap<String, (usize, usize)>,
}

enum Frame {
    /// A mapping: the path of the mapping, and the key we are waiting a value for.
    Map { path: String, key: Option<String> },
    /// A sequence: its path and the index of the next item.
    Seq { path: String, next: usize },
}

struct Builder {
    stack: Vec<Frame>,
    positions: HashMap<String, (usize, usize)>,
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

impl Builder {
    /// The path a value that starts now would have, advancing the parent's state.
    fn next_value_path(&mut self) -> Option<String> {
        match self.stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Seq { path, next }) => {
                let p = format!("{path}[{next}]");
                *next += 1;
                Some(p)
            }
            Some(Frame::Map { path, key }) => key.take().map(|k| join(path, &k)),
        }
    }

    fn record(&mut self, path: &str, span: Span) {
        self.positions
            .entry(path.to_string())
            .or_insert((span.start.line(), span.start.col() + 1));
    }
}

impl<'input> SpannedEventReceiver<'input> for Builder {
    fn on_event(&mut self, ev: Event<'input>, span: Span) {
        match ev {
            Event::Scalar(value, ..) => {
                // A scalar in key position names the next value.
                if let Some(Frame::Map { path, key }) = self.stack.last_mut() {
                    if key.is_none() {
                        let full = join(path, &value);
                        *key = Some(value.into_owned());
                        self.record(&full, span);
                        return;
                    }
                }
                if let Some(p) = self.next_value_path() {
                    self.record(&p, span);
                }
            }
            Event::Alias(_) => {
                let _ = self.next_value_path();
            }
            Event::MappingStart(..) => {
                let path = self.next_value_path().unwrap_or_default();
                self.record(&path, span);
                self.stack.push(Frame::Map { path, key: None });
            }
            Event::SequenceStart(..) => {
                let path = self.next_value_path().unwrap_or_default();
                self.record(&path, span);
                self.stack.push(Frame::Seq { path, next: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

impl SpanIndex {
    /// Index `text`. A file that does not parse gives an empty index (serde reports the syntax error).
    pub fn new(text: &str) -> Self {
        let mut builder = Builder {
            stack: Vec::new(),
            positions: HashMap::new(),
        };
        let mut parser = Parser::new_from_str(text);
        if parser.load(&mut builder, false).is_err() {
            return Self::default();
        }
        Self {
            positions: builder.positions,
        }
    }

    /// The position of `path`, or of its nearest ancestor that exists in the file.
    pub fn locate(&self, path: &str) -> (usize, usize) {
        let mut p = path;
        loop {
            if let Some(pos) = self.positions.get(p) {
                return *pos;
            }
            match p.rfind(['.', '[']) {
                Some(i) => p = &p[..i],
                None => return self.positions.get("").copied().unwrap_or((1, 1)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_nested_keys_and_items() {
        let yaml = "server:\n  listen: [\"a\", \"b\"]\nroutes:\n  - name: one\n    upstream: x\n  - name: two\n    upstream: y\n";
        let idx = SpanIndex::new(yaml);
        assert_eq!(idx.locate("server.listen"), (2, 3));
        assert_eq!(idx.locate("routes[1].upstream"), (7, 5));
        assert_eq!(idx.locate("routes[0].name"), (4, 5));
        // Missing field: nearest ancestor.
        assert_eq!(idx.locate("routes[1].match.hosts"), (6, 5));
    }
}

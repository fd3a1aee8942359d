//! `cowbackup ctl SOCKET COMMAND [ARGS]`: one QMP command to a QMP server on a Unix socket
//! (the nbdkit filter's control socket, QEMU, qemu-storage-daemon).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde_json::{json, Map, Value};

use crate::util::{failed, print_json, usage, CliResult};

/// Arguments of `ctl`.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The QMP Unix socket.
    pub socket: PathBuf,
    /// The QMP command (e.g. query-jobs, blockdev-backup, job-cancel).
    pub command: String,
    /// Arguments: KEY=VALUE pairs (VALUE is parsed as JSON when it is a number, true,
    /// false, null, an object or an array; otherwise it is a string; KEY may be dotted,
    /// a.b=1 gives {"a": {"b": 1}}), or one JSON object.
    pub args: Vec<String>,
    /// Seconds to wait for each reply.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
}

/// The command's `arguments` object from the command line.
pub fn parse_args(args: &[String]) -> Result<Map<String, Value>, String> {
    if args.len() == 1 && args[0].trim_start().starts_with('{') {
        return match serde_json::from_str::<Value>(&args[0]) {
            Ok(Value::Object(m)) => Ok(m),
            Ok(_) => Err("the arguments must be a JSON object".into()),
            Err(e) => Err(format!("arguments {:?}: {e}", args[0])),
        };
    }
    let mut root = Map::new();
    for arg in args {
        let (key, raw) = arg.split_once('=').ok_or_else(|| format!("argument {arg:?}: expected KEY=VALUE"))?;
        if key.is_empty() || key.split('.').any(str::is_empty) {
            return Err(format!("argument {arg:?}: empty key"));
        }
        let value = match serde_json::from_str::<Value>(raw) {
            Ok(v @ (Value::Number(_) | Value::Bool(_) | Value::Null | Value::Object(_) | Value::Array(_))) => v,
            _ => Value::String(raw.to_owned()),
        };
        let parts: Vec<&str> = key.split('.').collect();
        let mut obj = &mut root;
        for p in &parts[..parts.len() - 1] {
            let entry = obj.entry(p.to_string()).or_insert_with(|| Value::Object(Map::new()));
            obj = entry.as_object_mut().ok_or_else(|| format!("argument {arg:?}: {p} is not an object"))?;
        }
        let last = parts[parts.len() - 1];
        if obj.contains_key(last) {
            return Err(format!("argument {arg:?}: {key} given twice"));
        }
        obj.insert(last.to_owned(), value);
    }
    Ok(root)
}

/// One QMP session: reads lines, skips events.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    path: String,
}

impl Qmp {
    fn read(&mut self) -> CliResult<Value> {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.reader.read_line(&mut line).map_err(|e| failed(format!("{}: reading: {e}", self.path)))?;
            if n == 0 {
                return Err(failed(format!("{}: the server closed the connection", self.path)));
            }
            if line.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(line.trim())
                .map_err(|e| failed(format!("{}: not QMP (bad JSON: {e}): {}", self.path, line.trim())))?;
            if v.get("event").is_some() {
                continue;
            }
            return Ok(v);
        }
    }

    fn execute(&mut self, command: &str, arguments: Option<Map<String, Value>>) -> CliResult<Value> {
        let mut msg = json!({"execute": command});
        if let Some(a) = arguments {
            msg["arguments"] = Value::Object(a);
        }
        let text = format!("{msg}\n");
        self.writer.write_all(text.as_bytes()).map_err(|e| failed(format!("{}: sending: {e}", self.path)))?;
        let reply = self.read()?;
        if let Some(r) = reply.get("return") {
            return Ok(r.clone());
        }
        if let Some(e) = reply.get("error") {
            let class = e.get("class").and_then(Value::as_str).unwrap_or("GenericError");
            let desc = e.get("desc").and_then(Value::as_str).unwrap_or("(no description)");
            return Err(failed(format!("{command}: {desc} ({class})")));
        }
        Err(failed(format!("{}: unexpected reply to {command}: {reply}", self.path)))
    }
}

/// Run `ctl`.
pub fn run(a: CtlArgs) -> CliResult<()> {
    let arguments = parse_args(&a.args).map_err(usage)?;
    if a.timeout == 0 {
        return Err(usage("--timeout must be at least 1"));
    }
    let path = a.socket.display().to_string();
    let stream = UnixStream::connect(&a.socket).map_err(|e| failed(format!("{path}: connect: {e}")))?;
    let t = Some(Duration::from_secs(a.timeout));
    stream.set_read_timeout(t).and_then(|_| stream.set_write_timeout(t)).map_err(|e| failed(format!("{path}: {e}")))?;
    let writer = stream.try_clone().map_err(|e| failed(format!("{path}: {e}")))?;
    let mut qmp = Qmp { reader: BufReader::new(stream), writer, path: path.clone() };
    let greeting = qmp.read()?;
    if greeting.get("QMP").is_none() {
        return Err(failed(format!("{path}: not a QMP server (greeting: {greeting})")));
    }
    qmp.execute("qmp_capabilities", None)?;
    let ret = qmp.execute(&a.command, if arguments.is_empty() { None } else { Some(arguments) })?;
    print_json(&ret)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn key_value_arguments() {
        let m = parse_args(&s(&["id=job0", "speed=1000", "auto=true", "n=null", "a.b=x", "a.c=[1,2]"])).unwrap();
        assert_eq!(
            Value::Object(m),
            json!({"id": "job0", "speed": 1000, "auto": true, "n": null, "a": {"b": "x", "c": [1, 2]}})
        );
        // A value that is not a JSON number etc. stays a string, even one that looks quoted.
        let m = parse_args(&s(&["target=/tmp/a=b", "s=\"q\""])).unwrap();
        assert_eq!(Value::Object(m), json!({"target": "/tmp/a=b", "s": "\"q\""}));
    }

    #[test]
    fn json_arguments() {
        let m = parse_args(&s(&[r#"{"device": "d0", "sync": "full"}"#])).unwrap();
        assert_eq!(Value::Object(m), json!({"device": "d0", "sync": "full"}));
        assert!(parse_args(&s(&["[1]"])).is_err());
        assert!(parse_args(&s(&["{bad"])).is_err());
    }

    #[test]
    fn bad_arguments() {
        assert!(parse_args(&s(&["novalue"])).is_err());
        assert!(parse_args(&s(&["=x"])).is_err());
        assert!(parse_args(&s(&["a..b=x"])).is_err());
        assert!(parse_args(&s(&["a=1", "a=2"])).is_err());
        assert!(parse_args(&s(&["a=1", "a.b=2"])).is_err());
    }
}

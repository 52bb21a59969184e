//! libcrayon: the C ABI of Crayon. Apps link `-lcrayon` and include `crayon.h`; every call talks
//! to the running `crayond` over its local socket (docs/socket.md), so one model in memory serves
//! every app on the board.
//!
//! Conventions (also in the header):
//! * every function returning `crayon_status` reports failures by code, with a readable message
//!   from `crayon_last_error()` (per thread, valid until the thread's next libcrayon call);
//! * strings are UTF-8 and NUL-terminated; strings returned through `char **` are owned by the
//!   caller and freed with `crayon_string_free`;
//! * a `crayon_client` may be shared between threads: calls on it are serialized, except
//!   `crayon_cancel`, which may be called from any thread at any time to stop the call in
//!   progress; `crayon_client_free` must not race with other calls on the same client;
//! * no Rust panic crosses this boundary: it becomes `CRAYON_ERR_INTERNAL`.
#![allow(non_camel_case_types)]

use std::cell::RefCell;
use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::ptr;
use std::sync::Mutex;
use std::time::Duration;

use ::crayon_client::limits::MAX_CHOICES;
use ::crayon_client::{Canceller, Client, ClientError, Code, DEFAULT_TIMEOUT, default_path};
use serde_json::{Value, json};

/// Major version of libcrayon: the SONAME is `libcrayon.so.<major>`. Within one major version the ABI
/// only grows (new functions; new option fields at the end, read by `struct_size`), so an app built
/// against an older header runs with a newer library. (0.2.0 added `struct_size`; 0.1 was never
/// released with a SONAME.)
pub const CRAYON_VERSION_MAJOR: u32 = 0;
pub const CRAYON_VERSION_MINOR: u32 = 2;
pub const CRAYON_VERSION_PATCH: u32 = 0;
/// Version of the socket protocol this library speaks.
pub const CRAYON_PROTOCOL_VERSION: u32 = 1;

/// Result of every fallible call. `crayon_last_error()` says more.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum crayon_status {
    CRAYON_OK = 0,
    /// A NULL or invalid argument (not UTF-8, bad count...).
    CRAYON_ERR_INVALID_ARGUMENT = 1,
    /// The daemon's socket could not be reached (not running? wrong path? not in its group?).
    CRAYON_ERR_CONNECT = 2,
    /// Reading or writing the connection failed.
    CRAYON_ERR_IO = 3,
    /// No reply within the client's timeout.
    CRAYON_ERR_TIMEOUT = 4,
    /// The daemon and this library disagree on the protocol.
    CRAYON_ERR_PROTOCOL = 5,
    /// The daemon refused the request as invalid (bad option, request too large...).
    CRAYON_ERR_INVALID_REQUEST = 6,
    /// No such adapter.
    CRAYON_ERR_NOT_FOUND = 7,
    /// The daemon is at its limit: retry later.
    CRAYON_ERR_BUSY = 8,
    /// Cancelled (crayon_cancel, or the token callback asked to stop).
    CRAYON_ERR_CANCELLED = 9,
    /// This process's user may not use the service.
    CRAYON_ERR_PERMISSION_DENIED = 10,
    /// The daemon is shutting down.
    CRAYON_ERR_UNAVAILABLE = 11,
    /// The model or the daemon failed, or a bug (the message says which).
    CRAYON_ERR_INTERNAL = 12,
}

use crayon_status::*;

/// A connection to crayond. Opaque: create with `crayon_client_open`, free with `crayon_client_free`.
pub struct crayon_client {
    client: Mutex<Client>,
    canceller: Canceller,
}

/// Options of `crayon_generate` and `crayon_choose`. Initialize with
/// `crayon_generate_options_init(&opts, sizeof opts)` (which sets `struct_size`), then set fields.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct crayon_generate_options {
    /// `sizeof(crayon_generate_options)` as the app was compiled, recorded by
    /// `crayon_generate_options_init(&opts, sizeof opts)`. Later versions add fields only at the end and
    /// read (and initialize) only the fields an app's size covers, so an app built against an older
    /// header keeps working.
    pub struct_size: usize,
    /// Tokens to generate at most; 0: the service's default.
    pub max_tokens: u32,
    /// Sampling temperature (0 = greedy); negative: the service's default.
    pub temperature: f32,
    /// Nucleus sampling mass in (0, 1]; negative: the service's default.
    pub top_p: f32,
    /// Sampling seed; 0: the service's default.
    pub seed: u64,
    /// Customized adapter to answer with (see crayon_customize); NULL: the base model.
    pub adapter: *const c_char,
    /// System prompt; NULL: none.
    pub system: *const c_char,
}

impl crayon_generate_options {
    /// Every field "use the service's default".
    const DEFAULT: crayon_generate_options = crayon_generate_options {
        struct_size: size_of::<crayon_generate_options>(),
        max_tokens: 0,
        temperature: -1.0,
        top_p: -1.0,
        seed: 0,
        adapter: ptr::null(),
        system: ptr::null(),
    };

    /// The smallest `struct_size` this library accepts: the size of the first layout that had the
    /// field (every field of this version; fields added later get their defaults when an older app's
    /// size does not cover them).
    const MIN_SIZE: usize = size_of::<crayon_generate_options>();

    /// Reads an app's options: the fields its `struct_size` covers, defaults for the rest.
    unsafe fn read(p: *const crayon_generate_options) -> Fallible<crayon_generate_options> {
        let mut options = Self::DEFAULT;
        if p.is_null() {
            return Ok(options);
        }
        let size = unsafe { ptr::read_unaligned(p.cast::<usize>()) };
        if size < Self::MIN_SIZE {
            return Err(invalid(format!(
                "options.struct_size is {size}, expected {}: initialize the options with \
                 crayon_generate_options_init(&opts, sizeof opts)",
                Self::MIN_SIZE
            )));
        }
        if size > size_of::<crayon_generate_options>() {
            return Err(invalid(format!(
                "options.struct_size is {size}: the app was built against a newer crayon.h than this libcrayon                  ({}, whose options have {} bytes); upgrade libcrayon",
                env!("CARGO_PKG_VERSION"),
                size_of::<crayon_generate_options>()
            )));
        }
        // Copy only the bytes the app's struct has (equal today; the rule for later versions).
        unsafe { ptr::copy_nonoverlapping(p.cast::<u8>(), (&raw mut options).cast::<u8>(), size) };
        options.struct_size = size;
        Ok(options)
    }
}

/// Receives streamed text (UTF-8, `len` bytes, also NUL-terminated) on the calling thread. Return 0
/// to go on, non-zero to stop (the call then returns `CRAYON_ERR_CANCELLED`).
pub type crayon_token_fn = Option<unsafe extern "C" fn(text: *const c_char, len: usize, user_data: *mut c_void) -> i32>;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(msg: &str) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// Runs an ABI body: clears the last error, turns panics into `CRAYON_ERR_INTERNAL`.
fn guard(f: impl FnOnce() -> Result<(), (crayon_status, String)>) -> crayon_status {
    set_error("");
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => CRAYON_OK,
        Ok(Err((status, msg))) => {
            set_error(&msg);
            status
        }
        Err(_) => {
            set_error("internal error in libcrayon (a bug): please report it");
            CRAYON_ERR_INTERNAL
        }
    }
}

type Fallible<T> = Result<T, (crayon_status, String)>;

fn from_client(e: ClientError) -> (crayon_status, String) {
    let status = match &e {
        ClientError::Connect { .. } => CRAYON_ERR_CONNECT,
        ClientError::Io(_) => CRAYON_ERR_IO,
        ClientError::Timeout(_) => CRAYON_ERR_TIMEOUT,
        ClientError::Protocol(_) => CRAYON_ERR_PROTOCOL,
        ClientError::Service { code, .. } => match code {
            Code::Malformed | Code::Version => CRAYON_ERR_PROTOCOL,
            Code::FrameTooLarge | Code::InvalidRequest => CRAYON_ERR_INVALID_REQUEST,
            Code::NotFound => CRAYON_ERR_NOT_FOUND,
            Code::Busy => CRAYON_ERR_BUSY,
            Code::Cancelled => CRAYON_ERR_CANCELLED,
            Code::PermissionDenied => CRAYON_ERR_PERMISSION_DENIED,
            Code::ShuttingDown => CRAYON_ERR_UNAVAILABLE,
            Code::Internal => CRAYON_ERR_INTERNAL,
        },
    };
    (status, e.to_string())
}

fn invalid(msg: impl Into<String>) -> (crayon_status, String) {
    (CRAYON_ERR_INVALID_ARGUMENT, msg.into())
}

/// A required UTF-8 string argument.
unsafe fn arg_str<'a>(p: *const c_char, name: &str) -> Fallible<&'a str> {
    if p.is_null() {
        return Err(invalid(format!("{name} is NULL")));
    }
    unsafe { CStr::from_ptr(p) }.to_str().map_err(|_| invalid(format!("{name} is not valid UTF-8")))
}

unsafe fn opt_str<'a>(p: *const c_char, name: &str) -> Fallible<Option<&'a str>> {
    if p.is_null() { Ok(None) } else { unsafe { arg_str(p, name) }.map(Some) }
}

unsafe fn client_ref<'a>(c: *mut crayon_client) -> Fallible<&'a crayon_client> {
    if c.is_null() {
        return Err(invalid("client is NULL"));
    }
    Ok(unsafe { &*c })
}

/// Hands a string to the caller (freed with crayon_string_free); NULL `out` discards it.
unsafe fn give(out: *mut *mut c_char, s: &str) {
    if !out.is_null() {
        let c = CString::new(s.replace('\0', " ")).unwrap_or_default();
        unsafe { *out = c.into_raw() };
    }
}

unsafe fn clear(out: *mut *mut c_char) {
    if !out.is_null() {
        unsafe { *out = ptr::null_mut() };
    }
}

impl crayon_client {
    fn call(&self, op: Value, on_token: &mut dyn FnMut(&str) -> bool) -> Fallible<Value> {
        let mut client = self.client.lock().unwrap_or_else(|p| p.into_inner());
        client.call(op, on_token).map_err(from_client)
    }
}

/// Calls the C callback; a NULL callback takes everything.
fn token_sink(cb: crayon_token_fn, user_data: *mut c_void) -> impl FnMut(&str) -> bool {
    move |text: &str| match cb {
        None => true,
        Some(f) => {
            let c = CString::new(text.replace('\0', " ")).unwrap_or_default();
            let len = c.as_bytes().len();
            unsafe { f(c.as_ptr(), len, user_data) == 0 }
        }
    }
}

/// The library version, e.g. "0.2.0" (static storage).
#[unsafe(no_mangle)]
pub extern "C" fn crayon_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// The last error message of this thread ("" when the last call succeeded). Valid until this
/// thread's next libcrayon call; never NULL.
#[unsafe(no_mangle)]
pub extern "C" fn crayon_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// A short name for a status code, e.g. "CRAYON_ERR_BUSY" (static storage); "CRAYON_ERR_UNKNOWN" for a
/// value that is no `crayon_status` (e.g. one from a newer libcrayon). Takes an `int` so that any
/// value an app passes is defined behaviour.
#[unsafe(no_mangle)]
pub extern "C" fn crayon_status_name(status: c_int) -> *const c_char {
    let s: &'static str = match status_from_int(status) {
        Some(CRAYON_OK) => "CRAYON_OK\0",
        Some(CRAYON_ERR_INVALID_ARGUMENT) => "CRAYON_ERR_INVALID_ARGUMENT\0",
        Some(CRAYON_ERR_CONNECT) => "CRAYON_ERR_CONNECT\0",
        Some(CRAYON_ERR_IO) => "CRAYON_ERR_IO\0",
        Some(CRAYON_ERR_TIMEOUT) => "CRAYON_ERR_TIMEOUT\0",
        Some(CRAYON_ERR_PROTOCOL) => "CRAYON_ERR_PROTOCOL\0",
        Some(CRAYON_ERR_INVALID_REQUEST) => "CRAYON_ERR_INVALID_REQUEST\0",
        Some(CRAYON_ERR_NOT_FOUND) => "CRAYON_ERR_NOT_FOUND\0",
        Some(CRAYON_ERR_BUSY) => "CRAYON_ERR_BUSY\0",
        Some(CRAYON_ERR_CANCELLED) => "CRAYON_ERR_CANCELLED\0",
        Some(CRAYON_ERR_PERMISSION_DENIED) => "CRAYON_ERR_PERMISSION_DENIED\0",
        Some(CRAYON_ERR_UNAVAILABLE) => "CRAYON_ERR_UNAVAILABLE\0",
        Some(CRAYON_ERR_INTERNAL) => "CRAYON_ERR_INTERNAL\0",
        None => "CRAYON_ERR_UNKNOWN\0",
    };
    s.as_ptr().cast()
}

/// The status an `int` names, if any (never transmuted: an out-of-range enum value is undefined
/// behaviour in Rust).
fn status_from_int(v: c_int) -> Option<crayon_status> {
    const ALL: [crayon_status; 13] = [
        CRAYON_OK,
        CRAYON_ERR_INVALID_ARGUMENT,
        CRAYON_ERR_CONNECT,
        CRAYON_ERR_IO,
        CRAYON_ERR_TIMEOUT,
        CRAYON_ERR_PROTOCOL,
        CRAYON_ERR_INVALID_REQUEST,
        CRAYON_ERR_NOT_FOUND,
        CRAYON_ERR_BUSY,
        CRAYON_ERR_CANCELLED,
        CRAYON_ERR_PERMISSION_DENIED,
        CRAYON_ERR_UNAVAILABLE,
        CRAYON_ERR_INTERNAL,
    ];
    ALL.into_iter().find(|&s| s as c_int == v)
}

/// Connects to crayond. `socket_path` NULL: `$CRAYON_SOCKET`, else /run/crayon/crayon.sock.
/// On success `*out` holds a client to free with `crayon_client_free`; on failure `*out` is NULL.
///
/// # Safety
/// `out` must be valid for a write; `socket_path` NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn crayon_client_open(socket_path: *const c_char, out: *mut *mut crayon_client) -> crayon_status {
    guard(|| {
        if out.is_null() {
            return Err(invalid("out is NULL"));
        }
        unsafe { *out = ptr::null_mut() };
        let path = match unsafe { opt_str(socket_path, "socket_path") }? {
            Some(p) => PathBuf::from(p),
            None => default_path(),
        };
        let client = Client::connect(&path, DEFAULT_TIMEOUT).map_err(from_client)?;
        let canceller = client.canceller();
        let boxed = Box::new(crayon_client { client: Mutex::new(client), canceller });
        unsafe { *out = Box::into_raw(boxed) };
        Ok(())
    })
}

/// How long a call waits for the daemon's next message (default 300000 ms). 0 is refused.
///
/// # Safety
/// `client` must come from `crayon_client_open` and not be freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn crayon_client_set_timeout(client: *mut crayon_client, timeout_ms: u32) -> crayon_status {
    guard(|| {
        let c = unsafe { client_ref(client) }?;
        if timeout_ms == 0 {
            return Err(invalid("timeout_ms must be positive"));
        }
        let mut inner = c.client.lock().unwrap_or_else(|p| p.into_inner());
        inner.set_timeout(Duration::from_millis(timeout_ms.into())).map_err(from_client)
    })
}

/// Closes the connection (cancelling whatever it still had running) and frees the client. NULL is
/// a no-op.
///
/// # Safety
/// `client` must come from `crayon_client_open`, be freed once, and not be in use by another thread.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn crayon_client_free(client: *mut crayon_client) {
    if !client.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(client) })));
    }
}

/// Fills `options` with defaults (every field "use the service's default") and records `struct_size`,
/// the size of the struct as the app was compiled: pass `sizeof(crayon_generate_options)` (or `sizeof
/// opts`). Only that many bytes are written, so an app built against an older, smaller header is never
/// written past; fields this library does not know (a newer header) are left to the app and the
/// options are then refused by the calls that read them.
///
/// # Safety
/// `options` must be valid for a write of `struct_size` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn crayon_generate_options_init(options: *mut crayon_generate_options, struct_size: usize) {
    if options.is_null() || struct_size < size_of::<usize>() {
        return;
    }
    let defaults = crayon_generate_options::DEFAULT;
    let n = struct_size.min(size_of::<crayon_generate_options>());
    // SAFETY: the app vouches for `struct_size` writable bytes; `n` is no more than that nor than ours.
    unsafe {
        ptr::copy_nonoverlapping((&raw const defaults).cast::<u8>(), options.cast::<u8>(), n);
        ptr::write_unaligned(options.cast::<usize>(), struct_size);
    }
}

/// Generates an answer to `prompt` (one user message). Text streams to `on_token` (may be NULL) as
/// it is produced; the whole answer goes to `*out_text` (may be NULL; free it with
/// crayon_string_free). `options` may be NULL (all defaults).
///
/// # Safety
/// Pointers must be valid as documented; `on_token` must not unwind.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn crayon_generate(
    client: *mut crayon_client,
    prompt: *const c_char,
    options: *const crayon_generate_options,
    on_token: crayon_token_fn,
    user_data: *mut c_void,
    out_text: *mut *mut c_char,
) -> crayon_status {
    unsafe { clear(out_text) };
    guard(|| {
        let c = unsafe { client_ref(client) }?;
        let body = unsafe { chat_body(prompt, options) }?;
        let result =
            c.call(json!({"op": "chat", "stream": true, "body": body}), &mut token_sink(on_token, user_data))?;
        let text = result["choices"][0]["message"]["content"].as_str().unwrap_or_default();
        unsafe { give(out_text, text) };
        Ok(())
    })
}

/// The chat body of a one-message request with `options` (may be NULL).
unsafe fn chat_body(prompt: *const c_char, options: *const crayon_generate_options) -> Fallible<Value> {
    let prompt = unsafe { arg_str(prompt, "prompt") }?;
    let mut messages = Vec::new();
    let mut body = json!({});
    let o = unsafe { crayon_generate_options::read(options) }?;
    if let Some(system) = unsafe { opt_str(o.system, "options.system") }? {
        messages.push(json!({"role": "system", "content": system}));
    }
    if o.max_tokens > 0 {
        body["max_tokens"] = json!(o.max_tokens);
    }
    if o.temperature >= 0.0 {
        body["temperature"] = json!(o.temperature);
    }
    if o.top_p >= 0.0 {
        body["top_p"] = json!(o.top_p);
    }
    if o.seed != 0 {
        body["seed"] = json!(o.seed);
    }
    if let Some(a) = unsafe { opt_str(o.adapter, "options.adapter") }? {
        body["crayon"] = json!({"adapter": a});
    }
    messages.push(json!({"role": "user", "content": prompt}));
    body["messages"] = json!(messages);
    Ok(body)
}

/// Answers a choice question: `prompt` (one user message) with `count` options (full answer texts such
/// as "Paris", or labels such as "A"). The service scores each option by the likelihood of its text
/// after the prompt and answers with the best; its index goes to `*out_index` (may be NULL; SIZE_MAX
/// when a server answered in free text that names none of the options). The
/// `crayon` object of the reply (every option's log-probability and score, the probabilities, the
/// route) goes to `*out_json` as JSON (may be NULL; free it with crayon_string_free). `options` may be
/// NULL; its sampling fields do not apply (nothing is sampled).
///
/// # Safety
/// `choices` must point to `count` valid strings.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn crayon_choose(
    client: *mut crayon_client,
    prompt: *const c_char,
    options: *const crayon_generate_options,
    choices: *const *const c_char,
    count: usize,
    out_index: *mut usize,
    out_json: *mut *mut c_char,
) -> crayon_status {
    unsafe { clear(out_json) };
    guard(|| {
        let c = unsafe { client_ref(client) }?;
        if choices.is_null() || count < 2 {
            return Err(invalid("a choice question needs at least 2 choices (choices NULL or count < 2)"));
        }
        if count > MAX_CHOICES {
            return Err(invalid(format!("at most {MAX_CHOICES} choices, got {count}")));
        }
        let mut list = Vec::with_capacity(count);
        for i in 0..count {
            list.push(unsafe { arg_str(*choices.add(i), &format!("choices[{i}]")) }?.to_string());
        }
        let mut body = unsafe { chat_body(prompt, options) }?;
        match body.get_mut("crayon") {
            Some(ext) => ext["choices"] = json!(list),
            None => body["crayon"] = json!({"choices": list}),
        }
        let result = c.call(json!({"op": "chat", "stream": false, "body": body}), &mut |_| true)?;
        let ext = &result["crayon"];
        let index = ext["choice"].as_str().and_then(|chosen| list.iter().position(|o| o.trim() == chosen));
        let index = index.unwrap_or(usize::MAX);
        if !out_index.is_null() {
            unsafe { *out_index = index };
        }
        unsafe { give(out_json, &ext.to_string()) };
        Ok(())
    })
}

/// Sends a full OpenAI chat-completions request (JSON, with the `crayon` extension of docs/http.md)
/// and returns the full response JSON in `*out_json` (may be NULL). Text streams to `on_token`.
///
/// # Safety
/// Pointers must be valid as documented; `on_token` must not unwind.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn crayon_chat_json(
    client: *mut crayon_client,
    request_json: *const c_char,
    on_token: crayon_token_fn,
    user_data: *mut c_void,
    out_json: *mut *mut c_char,
) -> crayon_status {
    unsafe { clear(out_json) };
    guard(|| {
        let c = unsafe { client_ref(client) }?;
        let text = unsafe { arg_str(request_json, "request_json") }?;
        let body: Value = serde_json::from_str(text).map_err(|e| invalid(format!("request_json is not JSON: {e}")))?;
        let result =
            c.call(json!({"op": "chat", "stream": true, "body": body}), &mut token_sink(on_token, user_data))?;
        unsafe { give(out_json, &result.to_string()) };
        Ok(())
    })
}

/// Customizes adapter `name` from `count` examples (`inputs[i]` answered by `outputs[i]`): the
/// service blends its adapter pool for them in milliseconds. The examples stay on this device. The
/// result (adapter, blend weights, timings) goes to `*out_json` as JSON (may be NULL).
///
/// # Safety
/// `inputs` and `outputs` must point to `count` valid strings each.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn crayon_customize(
    client: *mut crayon_client,
    name: *const c_char,
    inputs: *const *const c_char,
    outputs: *const *const c_char,
    count: usize,
    out_json: *mut *mut c_char,
) -> crayon_status {
    unsafe { clear(out_json) };
    guard(|| {
        let c = unsafe { client_ref(client) }?;
        let name = unsafe { arg_str(name, "name") }?;
        if count == 0 || inputs.is_null() || outputs.is_null() {
            return Err(invalid("customizing needs at least one example (inputs/outputs NULL or count 0)"));
        }
        let mut examples = Vec::with_capacity(count);
        for i in 0..count {
            let input = unsafe { arg_str(*inputs.add(i), &format!("inputs[{i}]")) }?;
            let output = unsafe { arg_str(*outputs.add(i), &format!("outputs[{i}]")) }?;
            examples.push(json!({"input": input, "output": output}));
        }
        let body = json!({"name": name, "examples": examples});
        let result = c.call(json!({"op": "customize", "body": body}), &mut |_| true)?;
        unsafe { give(out_json, &result.to_string()) };
        Ok(())
    })
}

/// The saved adapters, as a JSON array, in `*out_json`.
///
/// # Safety
/// Pointers must be valid as documented.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn crayon_list_adapters(client: *mut crayon_client, out_json: *mut *mut c_char) -> crayon_status {
    unsafe { clear(out_json) };
    guard(|| {
        let c = unsafe { client_ref(client) }?;
        let result = c.call(json!({"op": "adapters"}), &mut |_| true)?;
        unsafe { give(out_json, &result["data"].to_string()) };
        Ok(())
    })
}

/// Removes saved adapter `name` (CRAYON_ERR_NOT_FOUND if there is none).
///
/// # Safety
/// Pointers must be valid as documented.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn crayon_remove_adapter(client: *mut crayon_client, name: *const c_char) -> crayon_status {
    guard(|| {
        let c = unsafe { client_ref(client) }?;
        let name = unsafe { arg_str(name, "name") }?;
        c.call(json!({"op": "remove", "name": name}), &mut |_| true)?;
        Ok(())
    })
}

/// The service's status (model, execution provider, queue, counters) as JSON in `*out_json`.
///
/// # Safety
/// Pointers must be valid as documented.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn crayon_get_status(client: *mut crayon_client, out_json: *mut *mut c_char) -> crayon_status {
    unsafe { clear(out_json) };
    guard(|| {
        let c = unsafe { client_ref(client) }?;
        let result = c.call(json!({"op": "status"}), &mut |_| true)?;
        unsafe { give(out_json, &result.to_string()) };
        Ok(())
    })
}

/// Cancels the call in progress on `client` (from any thread; a no-op when none is). That call
/// returns CRAYON_ERR_CANCELLED soon after (or its result, if it was finishing).
///
/// # Safety
/// `client` must come from `crayon_client_open` and not be freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn crayon_cancel(client: *mut crayon_client) -> crayon_status {
    guard(|| {
        let c = unsafe { client_ref(client) }?;
        c.canceller.cancel().map_err(|e| (CRAYON_ERR_IO, format!("cannot send the cancel request: {e}")))
    })
}

/// Frees a string returned by libcrayon. NULL is a no-op.
///
/// # Safety
/// `s` must come from libcrayon and be freed once.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn crayon_string_free(s: *mut c_char) {
    if !s.is_null() {
        drop(unsafe { CString::from_raw(s) });
    }
}

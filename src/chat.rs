//! Chat prompts: the model's own Jinja chat template (from `tokenizer_config.json`), rendered with
//! minijinja plus Python-compatible string methods, as transformers renders it.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Message {
        Message { role: role.into(), content: content.into() }
    }
}

#[derive(Deserialize)]
struct TokenizerConfig {
    chat_template: Option<String>,
    #[serde(default)]
    bos_token: Option<String>,
    #[serde(default)]
    eos_token: Option<String>,
}

pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// Reads `chat_template`, `bos_token` and `eos_token` from a Hugging Face `tokenizer_config.json`.
    pub fn load(tokenizer_config: &Path) -> Result<ChatTemplate> {
        let cfg: TokenizerConfig = crate::model::read_json(tokenizer_config, "tokenizer config")?;
        let source = cfg
            .chat_template
            .ok_or_else(|| Error::model(tokenizer_config, "no chat_template (the model cannot take chat requests)"))?;
        ChatTemplate::new(source, cfg.bos_token.unwrap_or_default(), cfg.eos_token.unwrap_or_default())
    }

    pub fn new(source: String, bos_token: String, eos_token: String) -> Result<ChatTemplate> {
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source).map_err(|e| Error::Template(format!("cannot compile: {e}")))?;
        Ok(ChatTemplate { env, bos_token, eos_token })
    }

    /// The prompt text for `messages`, ending with the assistant's turn opener.
    pub fn render(&self, messages: &[Message]) -> Result<String> {
        if messages.is_empty() {
            return Err(Error::InvalidRequest("a chat request needs at least one message".into()));
        }
        let tmpl = self.env.get_template("chat").map_err(|e| Error::Template(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(|e| Error::Template(format!("cannot render: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOLLM: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    #[test]
    fn renders_smollm_template_with_default_system_prompt() {
        let t = ChatTemplate::new(SMOLLM.into(), String::new(), String::new()).unwrap();
        let out = t.render(&[Message::new("user", "Hi")]).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = t.render(&[Message::new("system", "Be brief."), Message::new("user", "Hi")]).unwrap();
        assert!(out.starts_with("<|im_start|>system\nBe brief.<|im_end|>\n"));
    }

    #[test]
    fn python_string_methods_work() {
        let t = ChatTemplate::new("{{ messages[0].content.strip() }}".into(), String::new(), String::new()).unwrap();
        assert_eq!(t.render(&[Message::new("user", "  x  ")]).unwrap(), "x");
    }

    #[test]
    fn template_errors_are_reported() {
        assert!(matches!(ChatTemplate::new("{% for %}".into(), String::new(), String::new()), Err(Error::Template(_))));
        let t =
            ChatTemplate::new("{{ raise_exception('no system role') }}".into(), String::new(), String::new()).unwrap();
        let err = t.render(&[Message::new("user", "x")]).unwrap_err().to_string();
        assert!(err.contains("no system role"), "{err}");
        assert!(matches!(t.render(&[]), Err(Error::InvalidRequest(_))));
    }
}

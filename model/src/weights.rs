//! A model's weights, read from a GGUF file or a Hugging Face checkpoint (`*.safetensors`,
//! sharded or not) and handed out one tensor at a time in f32, in the layout the driver uses:
//! row-major `[out, in]` matrices and Hugging Face's rotate-half order of the Q/K rows.
//!
//! Tensors are named by their GGUF names (`blk.3.attn_q.weight`); Hugging Face names are mapped
//! to them. The GPU driver converts each tensor to bf16 as it uploads it, so a large model never
//! sits whole in host memory as f32.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::config::{Architecture, ModelConfig};
use crate::error::ModelFileError;
use crate::gguf::GgufFile;
use crate::tensor_names::{fused_part, hf_name};

/// Reading a model file fails only with a problem of the file.
type Result<T, E = ModelFileError> = std::result::Result<T, E>;

/// A row-major `[rows, cols]` f32 matrix (a vector is one row).
#[derive(Clone, Debug, PartialEq)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

/// One decoder block's weights; `M` is the matrix storage (host f32, or a GPU buffer).
#[derive(Clone, Debug)]
pub struct LayerWeights<M> {
    pub attn_norm: Vec<f32>,
    /// `[heads * head_dim, hidden]`, rows in rotate-half order.
    pub q: M,
    /// `[kv_heads * head_dim, hidden]`, rows in rotate-half order.
    pub k: M,
    pub v: M,
    /// Qwen2's Q, K and V biases.
    pub qkv_bias: Option<[Vec<f32>; 3]>,
    /// `[hidden, heads * head_dim]`.
    pub o: M,
    pub ffn_norm: Vec<f32>,
    /// `[ffn, hidden]` each.
    pub gate: M,
    pub up: M,
    /// `[hidden, ffn]`.
    pub down: M,
    /// The norms some families add to the block (see [`crate::block::BlockOptions`]).
    pub extra_norms: ExtraNorms,
}

/// Norm weights beyond the Llama block's two, each present when the family has it. They are
/// the weights the norm multiplies by (Hugging Face Gemma checkpoints store `w - 1`; the loader
/// adds the 1, as llama.cpp's converter does for GGUF files).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ExtraNorms {
    /// `[head_dim]` each: RMSNorm of every query and key head before RoPE.
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    /// `[hidden]` each: RMSNorm of the attention output and of the MLP output before the
    /// residual adds.
    pub post_attention_norm: Option<Vec<f32>>,
    pub post_ffn_norm: Option<Vec<f32>>,
}

/// All of a model's weights.
#[derive(Clone, Debug)]
pub struct ModelWeights<M> {
    /// `[vocab, hidden]`, kept on the host side as rows to gather from.
    pub embedding: M,
    pub layers: Vec<LayerWeights<M>>,
    pub output_norm: Vec<f32>,
    /// `[vocab, hidden]`; `None` when tied to the embedding.
    pub output: Option<M>,
}

impl<M> ModelWeights<M> {
    /// The output head: its own matrix, or the embedding when tied.
    pub fn output_head(&self) -> &M {
        self.output.as_ref().unwrap_or(&self.embedding)
    }
}

/// Where the tensors come from.
pub enum WeightFile {
    Gguf(GgufFile),
    Safetensors(SafetensorsFiles),
}

impl WeightFile {
    /// The file or folder, for errors.
    pub fn name(&self) -> &str {
        match self {
            WeightFile::Gguf(file) => &file.name,
            WeightFile::Safetensors(files) => &files.name,
        }
    }

    /// Tensor `name` (GGUF naming) as f32, checked to be `[rows, cols]`. A projection that
    /// the family stores fused (Phi-3's and GLM-4's `attn_qkv`, their `2 * ffn`-row `ffn_up`)
    /// is cut out of the fused tensor when the file has no separate one of `rows` rows.
    pub fn matrix(
        &self,
        config: &ModelConfig,
        name: &str,
        rows: usize,
        cols: usize,
    ) -> Result<Matrix> {
        if let Some(fused) = fused_part(config, name) {
            let separate = self.rows_of(config, name) == Some(rows);
            if !separate && (self.contains(config, &fused.tensor) || !self.contains(config, name)) {
                let whole = self.read(config, &fused.tensor, fused.rows, cols)?;
                let data = whole.data[fused.part.start * cols..fused.part.end * cols].to_vec();
                return Ok(Matrix { rows, cols, data });
            }
        }
        self.read(config, name, rows, cols)
    }

    /// The first dimension (rows, or length of a vector) of tensor `name`, if the file has it.
    fn rows_of(&self, config: &ModelConfig, name: &str) -> Option<usize> {
        match self {
            WeightFile::Gguf(file) => file.tensor(name).and_then(|info| match info.dims.len() {
                1 => Some(1),
                _ => info.dims.last().map(|&d| d as usize),
            }),
            WeightFile::Safetensors(files) => {
                files
                    .dims(config.architecture, name)
                    .map(|dims| match dims.len() {
                        1 => 1,
                        _ => dims[0],
                    })
            }
        }
    }

    /// Tensor `name` as stored, checked to be `[rows, cols]` (a vector: `rows` 1).
    fn read(&self, config: &ModelConfig, name: &str, rows: usize, cols: usize) -> Result<Matrix> {
        let (dims, mut data) = match self {
            WeightFile::Gguf(file) => {
                let info = file.tensor(name).ok_or_else(|| missing(&file.name, name))?;
                // GGML lists the fastest-varying dimension first.
                let dims: Vec<usize> = info.dims.iter().rev().map(|&d| d as usize).collect();
                (dims, file.dequantize(name)?)
            }
            WeightFile::Safetensors(files) => files.tensor(config.architecture, name)?,
        };
        let shape_ok = match dims.as_slice() {
            [n] => rows == 1 && *n == cols,
            [r, c] => *r == rows && *c == cols,
            _ => false,
        };
        if !shape_ok {
            let tensor = match self {
                WeightFile::Gguf(_) => name.to_owned(),
                WeightFile::Safetensors(_) => {
                    hf_name(config.architecture, name).unwrap_or_else(|| name.to_owned())
                }
            };
            return Err(ModelFileError {
                file: self.name().to_owned(),
                tensor: Some(tensor),
                reason: format!("has shape {dims:?}; the model's config needs [{rows}, {cols}]"),
            });
        }
        // llama.cpp's converter interleaves each head's Q/K rows for its adjacent-pair RoPE;
        // the kernels rotate halves, so undo it (Qwen2 and Phi-3 files are not permuted, and
        // GLM-4's adjacent pairs are its own, kept as they are).
        if matches!(self, WeightFile::Gguf(_)) && config.architecture == Architecture::Llama {
            let heads = match name.rsplit_once('.').map(|(stem, _)| stem) {
                Some(stem) if stem.ends_with(".attn_q") => Some(config.heads),
                Some(stem) if stem.ends_with(".attn_k") => Some(config.kv_heads),
                _ => None,
            };
            if let Some(heads) = heads {
                data = unpermute_rotary_rows(&data, heads, config.head_dim, cols);
            }
        }
        Ok(Matrix { rows, cols, data })
    }

    /// Tensor `name` as a vector of `len` values.
    /// A bias the family stores fused (GLM-4's `attn_qkv.bias`) is cut out of the fused one.
    /// Norm weights of a Hugging Face Gemma checkpoint, stored as `w - 1`, come back as `w`.
    pub fn vector(&self, config: &ModelConfig, name: &str, len: usize) -> Result<Vec<f32>> {
        if let Some(fused) = fused_part(config, name) {
            if !self.contains(config, name) {
                let whole = self.read(config, &fused.tensor, 1, fused.rows)?;
                return Ok(whole.data[fused.part].to_vec());
            }
        }
        let mut data = self.read(config, name, 1, len)?.data;
        if matches!(self, WeightFile::Safetensors(_))
            && config.architecture == Architecture::Gemma3
            && name.ends_with("norm.weight")
        {
            data.iter_mut().for_each(|w| *w += 1.0);
        }
        Ok(data)
    }

    /// Whether the file holds `name` (GGUF naming; mapped to `config`'s family's names).
    pub fn contains(&self, config: &ModelConfig, name: &str) -> bool {
        match self {
            WeightFile::Gguf(file) => file.tensor(name).is_some(),
            WeightFile::Safetensors(files) => files.locate(config.architecture, name).is_some(),
        }
    }

    /// Loads every weight, mapping each matrix through `convert` (identity for the CPU path,
    /// a bf16 upload for the GPU) as soon as it is read.
    pub fn load<M>(
        &self,
        config: &ModelConfig,
        mut convert: impl FnMut(Matrix) -> Result<M>,
    ) -> Result<ModelWeights<M>> {
        let (hidden, q_dim, kv_dim, ffn) =
            (config.hidden, config.q_dim(), config.kv_dim(), config.ffn);
        let mut matrix = |name: &str, rows, cols| convert(self.matrix(config, name, rows, cols)?);
        let embedding = matrix("token_embd.weight", config.vocab, hidden)?;
        let mut layers = Vec::with_capacity(config.layers);
        for layer in 0..config.layers {
            let name = |part: &str| format!("blk.{layer}.{part}");
            let qkv_bias = if config.architecture.qkv_bias() {
                Some([
                    self.vector(config, &name("attn_q.bias"), q_dim)?,
                    self.vector(config, &name("attn_k.bias"), kv_dim)?,
                    self.vector(config, &name("attn_v.bias"), kv_dim)?,
                ])
            } else {
                None
            };
            let block = &config.block;
            let optional = |present: bool, part: &str, len: usize| -> Result<Option<Vec<f32>>> {
                present
                    .then(|| self.vector(config, &name(part), len))
                    .transpose()
            };
            let extra_norms = ExtraNorms {
                q_norm: optional(block.qk_norm, "attn_q_norm.weight", config.head_dim)?,
                k_norm: optional(block.qk_norm, "attn_k_norm.weight", config.head_dim)?,
                post_attention_norm: optional(
                    block.post_norms,
                    "post_attention_norm.weight",
                    hidden,
                )?,
                post_ffn_norm: optional(block.post_norms, "post_ffw_norm.weight", hidden)?,
            };
            layers.push(LayerWeights {
                attn_norm: self.vector(config, &name("attn_norm.weight"), hidden)?,
                q: matrix(&name("attn_q.weight"), q_dim, hidden)?,
                k: matrix(&name("attn_k.weight"), kv_dim, hidden)?,
                v: matrix(&name("attn_v.weight"), kv_dim, hidden)?,
                qkv_bias,
                o: matrix(&name("attn_output.weight"), hidden, q_dim)?,
                ffn_norm: self.vector(config, &name("ffn_norm.weight"), hidden)?,
                gate: matrix(&name("ffn_gate.weight"), ffn, hidden)?,
                up: matrix(&name("ffn_up.weight"), ffn, hidden)?,
                down: matrix(&name("ffn_down.weight"), hidden, ffn)?,
                extra_norms,
            });
        }
        let output = if config.tied_embeddings {
            None
        } else {
            Some(matrix("output.weight", config.vocab, hidden)?)
        };
        Ok(ModelWeights {
            embedding,
            layers,
            output_norm: self.vector(config, "output_norm.weight", hidden)?,
            output,
        })
    }
}

/// Undoes llama.cpp's Q/K row permutation: within each head, GGUF row `2i + s` is Hugging
/// Face row `s * head_dim / 2 + i`.
pub fn unpermute_rotary_rows(data: &[f32], heads: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    let half = head_dim / 2;
    let mut out = vec![0.0; data.len()];
    for head in 0..heads {
        for s in 0..2 {
            for i in 0..half {
                let to = (head * head_dim + s * half + i) * cols;
                let from = (head * head_dim + 2 * i + s) * cols;
                out[to..to + cols].copy_from_slice(&data[from..from + cols]);
            }
        }
    }
    out
}

fn missing(file: &str, tensor: &str) -> ModelFileError {
    ModelFileError {
        file: file.to_owned(),
        tensor: Some(tensor.to_owned()),
        reason: "is not in the file".into(),
    }
}

/// A Hugging Face checkpoint's `*.safetensors` files, memory-mapped.
pub struct SafetensorsFiles {
    pub name: String,
    files: Vec<(PathBuf, memmap2::Mmap)>,
    /// Tensor name -> index into `files`.
    index: HashMap<String, usize>,
}

impl SafetensorsFiles {
    /// Opens `dir/model.safetensors`, or every shard `dir/model.safetensors.index.json` lists.
    pub fn open(dir: &Path) -> Result<SafetensorsFiles> {
        let name = dir.display().to_string();
        let fail = |file: &Path, reason: String| ModelFileError {
            file: file.display().to_string(),
            tensor: None,
            reason,
        };
        let index_path = dir.join("model.safetensors.index.json");
        let shard_names: Vec<String> = if index_path.is_file() {
            let text = std::fs::read_to_string(&index_path)
                .map_err(|e| fail(&index_path, format!("cannot be read: {e}")))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| fail(&index_path, format!("is not valid JSON: {e}")))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| fail(&index_path, "has no weight_map object".into()))?;
            let mut shards: Vec<String> = map
                .values()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect();
            shards.sort();
            shards.dedup();
            shards
        } else {
            vec!["model.safetensors".into()]
        };
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for shard in shard_names {
            if shard.contains('/') || shard.contains("..") {
                return Err(fail(
                    &index_path,
                    format!("names shard `{shard}` outside the folder"),
                ));
            }
            let path = dir.join(&shard);
            let file = std::fs::File::open(&path)
                .map_err(|e| fail(&path, format!("cannot be opened: {e}")))?;
            // SAFETY: the map is read-only and the checkpoint is not expected to change while
            // loaded; the header is validated by the safetensors parser before any tensor is read.
            let map = unsafe { memmap2::Mmap::map(&file) }
                .map_err(|e| fail(&path, format!("cannot be mapped: {e}")))?;
            let tensors = safetensors::SafeTensors::deserialize(&map)
                .map_err(|e| fail(&path, format!("is not a valid safetensors file: {e}")))?;
            for tensor in tensors.names() {
                index.insert(tensor.to_owned(), files.len());
            }
            files.push((path, map));
        }
        Ok(SafetensorsFiles { name, files, index })
    }

    fn locate(&self, architecture: Architecture, gguf_name: &str) -> Option<(String, usize)> {
        let name = hf_name(architecture, gguf_name)?;
        let file = *self.index.get(&name)?;
        Some((name, file))
    }

    /// The shape of tensor `gguf_name`, if the checkpoint has it.
    fn dims(&self, architecture: Architecture, gguf_name: &str) -> Option<Vec<usize>> {
        let (name, file) = self.locate(architecture, gguf_name)?;
        let tensors = safetensors::SafeTensors::deserialize(&self.files[file].1).ok()?;
        Some(tensors.tensor(&name).ok()?.shape().to_vec())
    }

    /// Tensor `gguf_name` of an `architecture` checkpoint as (dims, f32 values).
    fn tensor(
        &self,
        architecture: Architecture,
        gguf_name: &str,
    ) -> Result<(Vec<usize>, Vec<f32>)> {
        let (name, file) = self.locate(architecture, gguf_name).ok_or_else(|| {
            missing(
                &self.name,
                &hf_name(architecture, gguf_name).unwrap_or_else(|| gguf_name.to_owned()),
            )
        })?;
        let (path, map) = &self.files[file];
        let fail = |reason: String| ModelFileError {
            file: path.display().to_string(),
            tensor: Some(name.clone()),
            reason,
        };
        let tensors = safetensors::SafeTensors::deserialize(map)
            .map_err(|e| fail(format!("is not a valid safetensors file: {e}")))?;
        let view = tensors.tensor(&name).map_err(|e| fail(e.to_string()))?;
        let bytes = view.data();
        use safetensors::Dtype;
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(fail(format!(
                    "has dtype {other:?}; F32, BF16 and F16 are read"
                )))
            }
        };
        Ok((view.shape().to_vec(), data))
    }
}

"""The agent runtime: the Doubter's confidence in the model's own draft decides to answer, look something up, or
decline. Tools with JSON-schema arguments, a BM25 lookup over a local corpus, native tool calls through the chat
template, the loop (`MetaAgent`), a chat session, and `AgentComparison` of every gate on the same questions. It
imports the core, data and evaluation parts; they never import it."""

from ..names import AGENT_ACTIONS as ACTIONS
from ..names import AGENT_SCORERS as SCORERS
from .agent import AgentResult, InferenceBackend, MetaAgent, Thresholds, TorchBackend
from .chat import ChatLoop, Session
from .comparison import AgentComparison
from .native import NativeToolPrompt, NativeToolRenderer, Turn
from .retrieval import Corpus, Passage, answer_recall, lookup_tool
from .scorers import DoubterScorer, MinTokenScorer, ProbeScorer, RandomScorer
from .tools import Tool, ToolRegistry, ToolResult


__all__ = [
    "ACTIONS",
    "SCORERS",
    "AgentComparison",
    "AgentResult",
    "ChatLoop",
    "Corpus",
    "DoubterScorer",
    "InferenceBackend",
    "MetaAgent",
    "MinTokenScorer",
    "NativeToolPrompt",
    "NativeToolRenderer",
    "Passage",
    "ProbeScorer",
    "RandomScorer",
    "Session",
    "Thresholds",
    "Tool",
    "ToolRegistry",
    "ToolResult",
    "TorchBackend",
    "Turn",
    "answer_recall",
    "lookup_tool",
]

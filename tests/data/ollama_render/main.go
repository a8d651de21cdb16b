// Renders Ollama chat templates with Go's own text/template, the engine Ollama uses.
// Input (stdin): JSON list of {"template": string, "messages": [{"role", "content"}]}.
// Output (stdout): JSON list of rendered strings, or {"error": ...} per failed case.
// The data shape follows Ollama's template values: .Messages (Role, Content), .System, .Prompt,
// .Response; tests only fill .Messages, as Ollama does for chat requests.
package main

import (
	"bytes"
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Values struct {
	Messages []Message
	System   string
	Prompt   string
	Response string
}

type Case struct {
	Template string    `json:"template"`
	Messages []Message `json:"messages"`
}

type Result struct {
	Text  string `json:"text"`
	Error string `json:"error,omitempty"`
}

func render(c Case) Result {
	tmpl, err := template.New("ollama").Parse(c.Template)
	if err != nil {
		return Result{Error: "parse: " + err.Error()}
	}
	var out bytes.Buffer
	if err := tmpl.Execute(&out, Values{Messages: c.Messages}); err != nil {
		return Result{Error: "execute: " + err.Error()}
	}
	return Result{Text: out.String()}
}

func main() {
	var cases []Case
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		os.Stderr.WriteString("bad input: " + err.Error() + "\n")
		os.Exit(2)
	}
	results := make([]Result, len(cases))
	for i, c := range cases {
		results[i] = render(c)
	}
	json.NewEncoder(os.Stdout).Encode(results)
}
